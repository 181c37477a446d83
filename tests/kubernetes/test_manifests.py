"""Every Kubernetes overlay, rendered with `kubectl kustomize`: core objects valid against the
Kubernetes schemas (kubernetes-validate, offline), SpinApp, SpinAppExecutor, ScaledObject,
ServiceMonitor and PrometheusRule against their CRDs with unknown fields as errors, SpinApps and
their neighbours checked against spin.toml (manifest_checks), the monitoring wired to the
metrics route, the alert rules through `promtool test rules`, and each check shown to catch the
fault it is for.

Run by scripts/check-kubernetes.sh (part of scripts/test.sh).
"""

import copy
import os
import pathlib
import re
import shutil
import tempfile
import subprocess
import sys
import tomllib
import unittest

import kubernetes_validate
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import manifest_checks  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "kubernetes"
KUBERNETES_VERSION = "1.32"
# The seed's scaling.
PRODUCTION_BOUNDS = {"astria-message": (3, 10), "astria-image": (2, 5), "astria-payment": (2, 3)}
DEV_BOUNDS = {name: (1, 2) for name in PRODUCTION_BOUNDS}
# Under KEDA the workers scale on their outbox backlog (overlays/production-keda).
WORKER_BOUNDS = {f"{name}-worker": (2, 6) for name in PRODUCTION_BOUNDS}
OVERLAYS = {"dev": DEV_BOUNDS, "production": PRODUCTION_BOUNDS, "production-keda": PRODUCTION_BOUNDS | WORKER_BOUNDS}
# Kinds whose schemas are not Kubernetes' own (checked by manifest_checks instead).
CUSTOM_KINDS = {"SpinApp", "SpinAppExecutor", "ScaledObject", "ServiceMonitor", "PrometheusRule"}
# Who may open a connection to each SpinApp (network-policies.yaml), and in the overlays with
# monitoring (../../monitoring) Prometheus too, to scrape the maintenance SpinApp.
INGRESS_SOURCES = {
    "astria-message": {"namespace=ingress-nginx"},
    "astria-image": {"namespace=ingress-nginx"},
    "astria-payment": {"namespace=ingress-nginx"},
    "astria-maintenance": {"pods=app.kubernetes.io/component=maintenance-job"},
}
MONITORED = {"production", "production-keda"}


def ingress_sources(overlay):
    if overlay not in MONITORED:
        return INGRESS_SOURCES
    return INGRESS_SOURCES | {"astria-maintenance": INGRESS_SOURCES["astria-maintenance"] | {"namespace=monitoring"}}


def crd_schema(path):
    crd = yaml.safe_load((pathlib.Path(__file__).parent / "crds" / path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return manifest_checks.strict_schema(version["schema"]["openAPIV3Schema"])


def scaled_object_schema():
    # KEDA's ScaledObject, from models generated from KEDA's own CRD (cloudcoil-models-keda).
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    return manifest_checks.strict_schema(ScaledObject.model_json_schema(by_alias=True))


def prometheus_operator_schema(kind):
    # The Prometheus Operator's CRDs, as models generated from them (cloudcoil-models-prometheus-operator).
    from cloudcoil.models.prometheus_operator import v1

    return manifest_checks.strict_schema(getattr(v1, kind).model_json_schema(by_alias=True))


SCHEMAS = {
    "SpinApp": crd_schema("core.spinkube.dev_spinapps.yaml"),
    "SpinAppExecutor": crd_schema("core.spinkube.dev_spinappexecutors.yaml"),
    "ScaledObject": scaled_object_schema(),
    "ServiceMonitor": prometheus_operator_schema("ServiceMonitor"),
    "PrometheusRule": prometheus_operator_schema("PrometheusRule"),
}


def largest_accepted_body():
    """The largest `MAX_BODY` any component accepts (components/*/src/lib.rs)."""
    sizes = []
    for lib in (ROOT / "components").glob("*/src/lib.rs"):
        m = re.search(r"const MAX_BODY: usize = ([0-9_ *]+);", lib.read_text())
        if m:
            sizes.append(eval(m.group(1).replace("_", ""), {"__builtins__": {}}))  # digits and * only
    return max(sizes)


def committed_kubernetes_files():
    names = subprocess.run(["git", "ls-files", "kubernetes"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    return {n: (ROOT / n).read_text() for n in names if (ROOT / n).is_file()}


def render(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render_with_tracing(overlay):
    """`overlay` with the opt-in tracing Component added, as a user's overlay would add it."""
    (ROOT / "target").mkdir(exist_ok=True)
    # Resolved: target/ may be a link to the machine's shared build cache
    # (scripts/build-cache.sh), and the relative paths must lead back from where the folder
    # really is.
    work = pathlib.Path(tempfile.mkdtemp(dir=ROOT / "target")).resolve()
    try:
        rel = lambda p: os.path.relpath(p.resolve(), work)  # noqa: E731 (kustomize refuses absolute paths)
        (work / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel(K8S / "overlays" / overlay)],
            "components": [rel(K8S / "tracing")],
        }))
        out = subprocess.run(["kubectl", "kustomize", str(work)], check=True, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(work)
    return [d for d in yaml.safe_load_all(out) if d]


def selects(selector, labels):
    """Whether a NetworkPolicy podSelector (matchLabels, matchExpressions In/Exists) selects `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        if e["operator"] == "Exists" and e["key"] not in labels:
            return False
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


ALERT_TESTS = pathlib.Path(__file__).parent / "alerts.test.yaml"
MAINTENANCE_SOURCE = (ROOT / "components/maintenance-service/src/lib.rs").read_text()


def metric_names(expr):
    """The metric names a PromQL expression reads (words followed by `{`, `[` or standing alone
    as an argument), leaving out functions, keywords and label names."""
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[|\))", re.sub(r'"[^"]*"', '""', expr)))
    return {w for w in words if w not in {"by", "without", "on", "ignoring", "vector"}}


def promtool_problems(groups):
    """Runs `promtool check rules` and `promtool test rules` (tests/kubernetes/alerts.test.yaml)
    on `groups`: '' when both pass, their output otherwise, None when there is no promtool."""
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        shutil.copy(ALERT_TESTS, pathlib.Path(tmp) / "alerts.test.yaml")
        out = ""
        for args in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts.test.yaml"]):
            r = subprocess.run([promtool, *args], cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0:
                out += f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"
        return out


def secret_keys():
    keys = set()
    for line in (K8S / "secrets.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            keys.add(line.split("=", 1)[0])
    return keys


SPIN_TOML = tomllib.loads((ROOT / "spin.toml").read_text())
APP = manifest_checks.App(SPIN_TOML)


class EveryOverlay(unittest.TestCase):
    def test_core_objects_are_valid_kubernetes(self):
        for overlay in OVERLAYS:
            for doc in render(overlay):
                if doc["kind"] in CUSTOM_KINDS:
                    continue
                with self.subTest(overlay=overlay, object=f"{doc['kind']}/{doc['metadata']['name']}"):
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)

    def test_spinapps_ingress_cronjobs_and_budgets_satisfy_the_project_rules(self):
        for overlay, bounds in OVERLAYS.items():
            with self.subTest(overlay=overlay):
                self.assertEqual(manifest_checks.problems(render(overlay), APP, secret_keys(), bounds), [])

    def test_custom_resources_match_their_crds_with_unknown_fields_refused(self):
        for overlay in OVERLAYS:
            with self.subTest(overlay=overlay):
                self.assertEqual(manifest_checks.schema_problems(render(overlay), SCHEMAS), [])

    def test_only_the_ingress_controller_and_the_cronjobs_reach_the_spinapps(self):
        for overlay in OVERLAYS:
            with self.subTest(overlay=overlay):
                self.assertEqual(manifest_checks.ingress_policy_problems(render(overlay), ingress_sources(overlay)), [])

    def test_the_ingress_admits_the_largest_body_the_app_accepts(self):
        self.assertEqual(largest_accepted_body(), 3 * 1024 * 1024, "the WhatsApp webhook's limit")
        for overlay in OVERLAYS:
            with self.subTest(overlay=overlay):
                self.assertEqual(manifest_checks.body_limit_problems(render(overlay), largest_accepted_body()), [])

    def test_no_secret_value_is_committed(self):
        self.assertEqual(manifest_checks.committed_secret_problems(committed_kubernetes_files(), secret_keys()), [])

    def test_the_dev_secret_has_every_key_and_production_generates_none(self):
        dev = {d["metadata"]["name"]: d for d in render("dev") if d["kind"] == "Secret"}
        self.assertEqual(set(dev["astria-secrets"]["data"]), secret_keys())
        self.assertIn("runtime-config.toml", dev["astria-runtime-config"]["data"])
        self.assertEqual([d for d in render("production") if d["kind"] == "Secret"], [], "real secrets are created out of band")

    def test_every_runtime_config_defines_every_sqlite_label_the_components_declare(self):
        """Spin refuses to start a component whose SQLite label no runtime config defines (it
        defines `default` itself): the dev Secret's file, the one production's Secret is made
        from, and the local run's."""
        spin = tomllib.loads((ROOT / "spin.toml").read_text())
        labels = {label for c in spin["component"].values() for label in c.get("sqlite_databases", [])}
        labels -= {"default"}
        self.assertIn("inbox", labels)
        for path in [K8S / "runtime-config.toml", K8S / "overlays/dev/runtime-config.toml", ROOT / "runtime-config.toml"]:
            with self.subTest(path=str(path.relative_to(ROOT))):
                defined = set(tomllib.loads(path.read_text()).get("sqlite_database", {}))
                self.assertEqual(labels - defined, set())

    def test_the_cronjob_command_sends_the_mounted_token_as_a_bearer_header(self):
        """Runs each CronJob's own shell command with curl, against a local server standing in
        for maintenance-service, with the token file where the Secret volume would put it."""
        import http.server
        import shutil
        import tempfile
        import threading

        if not shutil.which("curl"):
            self.skipTest("curl is not installed")
        seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                seen.append((self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                token_file = pathlib.Path(tmp) / "admin_token"
                token_file.write_text("t0ken-from-the-secret")
                for cj in (d for d in render("production") if d["kind"] == "CronJob"):
                    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                    container = pod["containers"][0]
                    mount = container["volumeMounts"][0]["mountPath"]
                    script = container["args"][0].replace(f"{mount}/admin_token", str(token_file))
                    script = script.replace("http://astria-maintenance", f"http://127.0.0.1:{server.server_port}")
                    subprocess.run(container["command"][:1] + container["command"][1:] + [script], check=True, timeout=30)
        finally:
            server.shutdown()
        self.assertEqual(sorted(seen), [("/maintenance/relay", "Bearer t0ken-from-the-secret"), ("/maintenance/run", "Bearer t0ken-from-the-secret")])

    def test_keda_replaces_every_hpa_and_scales_the_workers_on_their_backlog(self):
        docs = render("production-keda")
        kinds = [d["kind"] for d in docs]
        self.assertNotIn("HorizontalPodAutoscaler", kinds)
        self.assertEqual(kinds.count("ScaledObject"), 6)
        channels = {t["component"]: t["channel"] for t in SPIN_TOML["trigger"]["redis"]}
        spinapps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "SpinApp"}
        for so in (d for d in docs if d["kind"] == "ScaledObject" and d["spec"]["scaleTargetRef"]["name"].endswith("-worker")):
            target = so["spec"]["scaleTargetRef"]["name"]
            with self.subTest(worker=target):
                (component,) = spinapps[target]["spec"]["components"]
                (trigger,) = so["spec"]["triggers"]
                self.assertEqual(trigger["type"], "prometheus")
                self.assertIn(f'astria_outbox_backlog{{channel="{channels[component]}"}}', trigger["metadata"]["query"])
                self.assertIn(metric_names(trigger["metadata"]["query"]), [{"astria_outbox_backlog"}])

    def test_the_service_monitor_scrapes_the_metrics_route_of_the_maintenance_pods_with_the_read_only_token(self):
        for overlay in MONITORED:
            with self.subTest(overlay=overlay):
                docs = render(overlay)
                (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
                services = [d for d in docs if d["kind"] == "Service"
                            and all(d["metadata"].get("labels", {}).get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
                self.assertEqual(len(services), 1, "the ServiceMonitor selects exactly one Service")
                self.assertEqual(services[0]["spec"]["selector"], {"core.spinkube.dev/app-name": "astria-maintenance"})
                (endpoint,) = monitor["spec"]["endpoints"]
                self.assertIn(endpoint["port"], [p["name"] for p in services[0]["spec"]["ports"]])
                self.assertEqual(endpoint["path"], "/maintenance/metrics")
                self.assertIn('"/maintenance/metrics") => authorize_read', MAINTENANCE_SOURCE, "the route and its read-only auth")
                self.assertEqual(endpoint["authorization"]["credentials"], {"name": "astria-secrets", "key": "metrics_token"})
                self.assertIn("metrics_token", secret_keys())

    def test_the_alerts_use_only_metrics_the_app_exports_and_each_has_a_promtool_test(self):
        (rule,) = [d for d in render("production") if d["kind"] == "PrometheusRule"]
        rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
        exported = set(re.findall(r'"(astria_[a-z_]+)"', (ROOT / "shared/store/src/metrics.rs").read_text()))
        tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for t in case["alert_rule_test"]}
        self.assertEqual({r["alert"] for r in rules}, tested, "every alert has a promtool test, and every test an alert")
        for r in rules:
            with self.subTest(alert=r["alert"]):
                ours = {m for m in metric_names(r["expr"]) if m.startswith("astria_")}
                self.assertLessEqual(ours, exported, "a metric the app does not export never fires")
                self.assertIn(r["labels"]["severity"], {"warning", "critical"})

    def test_the_alert_rules_pass_promtool(self):
        (rule,) = [d for d in render("production") if d["kind"] == "PrometheusRule"]
        problems = promtool_problems(rule["spec"]["groups"])
        if problems is None:
            self.skipTest("promtool is not installed (scripts/check-kubernetes.sh installs Debian's prometheus); checked by schema only")
        self.assertEqual(problems, "")

    def test_every_service_has_an_http_spinapp_and_a_worker_spinapp(self):
        names = sorted(d["metadata"]["name"] for d in render("production") if d["kind"] == "SpinApp")
        self.assertEqual(names, sorted([
            "astria-message", "astria-message-worker", "astria-conversation-worker", "astria-image",
            "astria-image-worker", "astria-payment", "astria-payment-worker", "astria-maintenance",
        ]))


class TheTracingComponent(unittest.TestCase):
    """kubernetes/tracing, added to each overlay: every SpinApp exports its spans to the collector
    its components may call and its pods may reach, Spin's own spans go to the same place, and
    the overlay still passes every other check."""

    def test_every_spinapp_exports_to_a_collector_it_may_reach_and_the_overlay_stays_valid(self):
        for overlay, bounds in OVERLAYS.items():
            with self.subTest(overlay=overlay):
                docs = render_with_tracing(overlay)
                self.assertEqual(manifest_checks.problems(docs, APP, secret_keys(), bounds), [])
                self.assertEqual(manifest_checks.schema_problems(docs, SCHEMAS), [])
                policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
                for p in policies:
                    kubernetes_validate.validate(p, KUBERNETES_VERSION, strict=True)
                (executor,) = [d for d in docs if d["kind"] == "SpinAppExecutor"]
                endpoint = executor["spec"]["deploymentConfig"]["otel"]["exporter_otlp_endpoint"]
                for app in (d for d in docs if d["kind"] == "SpinApp"):
                    name = app["metadata"]["name"]
                    variables = {v["name"]: v.get("value") for v in app["spec"]["variables"]}
                    self.assertEqual(variables.get("otel_traces_enabled"), "true", name)
                    self.assertEqual(variables.get("otel_collector_url"), endpoint, name)
                    port = int(endpoint.rsplit(":", 1)[1])
                    labels = {"core.spinkube.dev/app-name": name}
                    self.assertTrue(any(
                        selects(p["spec"]["podSelector"], labels)
                        and any(port in [x["port"] for x in rule.get("ports", [])] for rule in p["spec"].get("egress", []))
                        for p in policies), f"{name} may not reach the collector's port {port}")
                    for component in app["spec"]["components"]:
                        c = SPIN_TOML["component"][component]
                        self.assertIn("{{ otel_collector_url }}", c["allowed_outbound_hosts"], component)
                        self.assertEqual(c["variables"].get("otel_traces_enabled"), "{{ otel_traces_enabled }}", component)
                        self.assertEqual(c["variables"].get("otel_collector_url"), "{{ otel_collector_url }}", component)

    def test_without_the_component_nothing_is_exported(self):
        self.assertEqual(SPIN_TOML["variables"]["otel_traces_enabled"]["default"], "false")
        for overlay in OVERLAYS:
            for app in (d for d in render(overlay) if d["kind"] == "SpinApp"):
                self.assertNotIn("otel_traces_enabled", {v["name"] for v in app["spec"]["variables"]})


class TheChecksCatchFaults(unittest.TestCase):
    """Each fault, planted in the rendered production overlay, is reported."""

    def setUp(self):
        self.docs = render("production")

    def spinapp(self, docs, name):
        return next(d for d in docs if d["kind"] == "SpinApp" and d["metadata"]["name"] == name)

    def assertCaught(self, mutate, expected):
        docs = copy.deepcopy(self.docs)
        mutate(docs)
        found = manifest_checks.problems(docs, APP, secret_keys(), PRODUCTION_BOUNDS)
        self.assertTrue(any(expected in p for p in found), f"expected '{expected}' in {found}")

    def test_a_component_not_in_spin_toml(self):
        self.assertCaught(lambda d: self.spinapp(d, "astria-message")["spec"]["components"].append("mesage-service"), "'mesage-service' is not in spin.toml")

    def test_a_component_left_out_or_run_twice(self):
        self.assertCaught(lambda d: self.spinapp(d, "astria-image-worker")["spec"]["components"].remove("image-trainer"), "components in no SpinApp: image-trainer")
        self.assertCaught(lambda d: self.spinapp(d, "astria-payment")["spec"]["components"].append("image-trainer"), "also runs in SpinApp")

    def test_a_missing_secret_key(self):
        def typo(d):
            v = next(v for v in self.spinapp(d, "astria-payment-worker")["spec"]["variables"] if v["name"] == "stripe_secret_key")
            v["valueFrom"]["secretKeyRef"]["key"] = "stripe_key"
        self.assertCaught(typo, "secret key 'stripe_key' missing")

    def test_a_secret_variable_not_supplied_or_given_literally(self):
        def drop(d):
            spec = self.spinapp(d, "astria-maintenance")["spec"]
            spec["variables"] = [v for v in spec["variables"] if v["name"] != "admin_token"]
        self.assertCaught(drop, "'admin_token' (required or secret) is not supplied")
        def literal(d):
            v = next(v for v in self.spinapp(d, "astria-message")["spec"]["variables"] if v["name"] == "whatsapp_app_secret")
            v.pop("valueFrom")
            v["value"] = "hunter2"
        self.assertCaught(literal, "secret variable 'whatsapp_app_secret' must come from a Secret")

    def test_a_wrong_image(self):
        for bad in ["registry.example.com/astria-bot/astria-bot:latest", "registry.example.com/other:0.1.0", "astria-bot"]:
            self.assertCaught(lambda d, bad=bad: self.spinapp(d, "astria-image")["spec"].__setitem__("image", bad), "is not <registry>/astria-bot")

    def test_a_probe_on_a_missing_route_or_another_services_route(self):
        self.assertCaught(lambda d: self.spinapp(d, "astria-image")["spec"]["checks"]["readiness"]["httpGet"].__setitem__("path", "/healthz"), "readiness probe /healthz")
        self.assertCaught(lambda d: self.spinapp(d, "astria-image")["spec"]["checks"]["readiness"]["httpGet"].__setitem__("path", "/health/message"), "readiness probe /health/message")

    def test_a_liveness_probe_that_depends_on_a_dependency(self):
        self.assertCaught(lambda d: self.spinapp(d, "astria-image")["spec"]["checks"]["liveness"]["httpGet"].__setitem__("path", "/health/image"), "liveness probe /health/image may depend on a dependency")

    def test_a_worker_with_probes(self):
        def probes(d):
            self.spinapp(d, "astria-message-worker")["spec"]["checks"] = copy.deepcopy(self.spinapp(d, "astria-message")["spec"]["checks"])
        self.assertCaught(probes, "astria-message-worker: has probes but no HTTP component")

    def test_a_spinapp_mixing_http_and_redis_trigger_components(self):
        def mix(d):
            self.spinapp(d, "astria-payment-worker")["spec"]["components"].remove("payment-checkout")
            self.spinapp(d, "astria-payment")["spec"]["components"].append("payment-checkout")
        self.assertCaught(mix, "astria-payment: mixes HTTP components (payment-service) with Redis-trigger components (payment-checkout)")

    def test_a_worker_without_the_trigger_address(self):
        def drop(d):
            spec = self.spinapp(d, "astria-message-worker")["spec"]
            spec["variables"] = [v for v in spec["variables"] if v["name"] != "redis_url"]
        self.assertCaught(drop, "does not supply 'redis_url' (the trigger address)")

    def test_an_executor_missing_from_the_namespace(self):
        def elsewhere(d):
            next(x for x in d if x["kind"] == "SpinAppExecutor")["metadata"]["namespace"] = "spin-operator"
        self.assertCaught(elsewhere, "executor 'containerd-shim-spin' has no SpinAppExecutor in namespace astria-bot")
        self.assertCaught(lambda d: d.remove(next(x for x in d if x["kind"] == "SpinAppExecutor")), "has no SpinAppExecutor")

    def test_a_service_account_that_mounts_its_token(self):
        self.assertCaught(lambda d: next(x for x in d if x["kind"] == "ServiceAccount").__setitem__("automountServiceAccountToken", True), "mounts its token")
        self.assertCaught(lambda d: self.spinapp(d, "astria-image")["spec"].pop("serviceAccountName"), "astria-image: no serviceAccountName")

    def test_an_admin_token_in_the_environment_or_not_mounted(self):
        def env(d):
            c = next(x for x in d if x["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            c["env"] = [{"name": "ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "astria-secrets", "key": "admin_token"}}}]
        self.assertCaught(env, "passes the admin token in the environment")
        self.assertCaught(lambda d: next(x for x in d if x["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"].pop("volumes"), "does not mount the admin token")

    def test_unknown_or_mistyped_fields_in_custom_resources(self):
        docs = copy.deepcopy(self.docs)
        self.spinapp(docs, "astria-message")["spec"]["replica"] = 3
        self.spinapp(docs, "astria-image")["spec"]["checks"]["liveness"]["httpGet"]["port"] = 8080
        next(x for x in docs if x["kind"] == "SpinAppExecutor")["spec"]["deploymentConfig"]["runtimeClass"] = "x"
        self.spinapp(docs, "astria-payment")["spec"]["enableAutoscaling"] = "yes"
        found = manifest_checks.schema_problems(docs, SCHEMAS)
        for expected in ["SpinApp astria-message: spec: Additional properties are not allowed ('replica'",
                         "SpinApp astria-image: spec/checks/liveness/httpGet: Additional properties are not allowed ('port'",
                         "SpinAppExecutor containerd-shim-spin: spec/deploymentConfig: Additional properties are not allowed ('runtimeClass'",
                         "SpinApp astria-payment: spec/enableAutoscaling: 'yes' is not of type 'boolean'"]:
            self.assertTrue(any(p.startswith(expected) for p in found), f"expected '{expected}' in {found}")
        keda = [d for d in render("production-keda") if d["kind"] == "ScaledObject"]
        keda[0]["spec"]["minReplicas"] = 3
        keda[1]["spec"]["triggers"][0]["metadata"] = "70"
        found = manifest_checks.schema_problems(keda, SCHEMAS)
        self.assertTrue(any("spec: Additional properties are not allowed ('minReplicas'" in p for p in found), found)
        self.assertTrue(any("spec/triggers/0/metadata: '70' is not of type 'object'" in p for p in found), found)
        monitoring = [d for d in copy.deepcopy(self.docs) if d["kind"] in ("ServiceMonitor", "PrometheusRule")]
        next(d for d in monitoring if d["kind"] == "ServiceMonitor")["spec"]["endpoints"][0]["bearerTokenSecrett"] = "x"
        next(d for d in monitoring if d["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"][0]["for"] = 5
        found = manifest_checks.schema_problems(monitoring, SCHEMAS)
        self.assertTrue(any(p.startswith("ServiceMonitor") and "'bearerTokenSecrett' was unexpected" in p for p in found), found)
        self.assertTrue(any(p.startswith("PrometheusRule") and "'for': 5" in p for p in found), found)

    def test_a_network_policy_that_opens_a_worker_or_no_default_deny(self):
        docs = copy.deepcopy(self.docs)
        docs.append({"kind": "NetworkPolicy", "metadata": {"name": "oops"}, "spec": {
            "podSelector": {"matchLabels": {"core.spinkube.dev/app-name": "astria-image-worker"}},
            "ingress": [{}]}})
        found = manifest_checks.ingress_policy_problems(docs, ingress_sources("production"))
        self.assertIn("SpinApp astria-image-worker: ingress allowed from ['anyone'], expected nobody", found)
        docs = [d for d in copy.deepcopy(self.docs) if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "default-deny")]
        self.assertIn("no default-deny NetworkPolicy (ingress and egress) for the namespace", manifest_checks.ingress_policy_problems(docs, ingress_sources("production")))

    def test_an_alert_that_fires_too_late_or_for_the_wrong_series(self):
        (rule,) = [d for d in self.docs if d["kind"] == "PrometheusRule"]
        if promtool_problems(rule["spec"]["groups"]) is None:
            self.skipTest("promtool is not installed")
        for alert, change in [
            ("AstriaOutboxBacklogOld", lambda r: r.__setitem__("expr", r["expr"].replace("> 600", "> 1200"))),
            ("AstriaWebhook5xx", lambda r: r.__setitem__("expr", r["expr"].replace('ingress="astria-webhooks", ', ""))),
            ("AstriaDeadLetters", lambda r: r.__setitem__("for", "10m")),
        ]:
            with self.subTest(alert=alert):
                groups = copy.deepcopy(rule["spec"]["groups"])
                change(next(r for g in groups for r in g["rules"] if r["alert"] == alert))
                self.assertIn(f"alertname: {alert}", promtool_problems(groups))

    def test_an_ingress_body_limit_below_what_the_app_accepts(self):
        docs = copy.deepcopy(self.docs)
        next(x for x in docs if x["kind"] == "Ingress")["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] = "1m"
        found = manifest_checks.body_limit_problems(docs, largest_accepted_body())
        self.assertTrue(any("body limit 1m is below" in p for p in found), found)

    def test_a_committed_secret_value(self):
        files = committed_kubernetes_files()
        files["kubernetes/overlays/dev/secrets.env"] = "admin_token=dev-admin-token\n"
        files["kubernetes/base/leak.yaml"] = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: x\nstringData:\n  admin_token: hunter2\n"
        files["kubernetes/overlays/x/kustomization.yaml"] = "secretGenerator:\n- name: s\n  literals: [admin_token=hunter2]\n"
        found = manifest_checks.committed_secret_problems(files, secret_keys())
        self.assertIn("kubernetes/overlays/dev/secrets.env: commits values for secret keys ['admin_token']", found)
        self.assertIn("kubernetes/base/leak.yaml: commits Secret x with values", found)
        self.assertIn("kubernetes/overlays/x/kustomization.yaml: secretGenerator s commits literal values", found)

    def test_replicas_with_autoscaling_and_wrong_bounds(self):
        self.assertCaught(lambda d: self.spinapp(d, "astria-message")["spec"].__setitem__("replicas", 3), "replicas must be unset")
        def bounds(d):
            hpa = next(x for x in d if x["kind"] == "HorizontalPodAutoscaler" and x["spec"]["scaleTargetRef"]["name"] == "astria-message")
            hpa["spec"]["minReplicas"] = 1
        self.assertCaught(bounds, "autoscaler bounds (1, 10)")

    def test_an_ingress_path_to_the_wrong_service_or_a_private_route_exposed(self):
        def wrong(d):
            ing = next(x for x in d if x["kind"] == "Ingress")
            ing["spec"]["rules"][0]["http"]["paths"][1]["backend"]["service"]["name"] = "astria-message"
        self.assertCaught(wrong, "Ingress sends /payment-received to astria-message")
        def private(d):
            ing = next(x for x in d if x["kind"] == "Ingress")
            paths = ing["spec"]["rules"][0]["http"]["paths"]
            paths.append(copy.deepcopy(paths[0]) | {"path": "/maintenance/run"})
        self.assertCaught(private, "Ingress exposes /maintenance/run")

    def test_a_worker_that_cannot_say_which_replica_went_deaf(self):
        def unnamed(d):
            spec = self.spinapp(d, "astria-image-worker")["spec"]
            spec["variables"] = [v for v in spec["variables"] if v["name"] != "replica_name"]
        self.assertCaught(unnamed, "astria-image-worker: runs a Redis trigger but does not name its replica")

    def test_alerts_prometheus_would_not_select(self):
        rule = lambda d: next(x for x in d if x["kind"] == "PrometheusRule")
        self.assertCaught(lambda d: rule(d)["metadata"]["labels"].pop("release"), "PrometheusRule astria-bot: no release label")
        self.assertCaught(lambda d: rule(d)["metadata"]["labels"].__setitem__("release", "prom"), "release label 'prom'")

    def test_no_way_for_the_acme_challenge_to_reach_cert_managers_solver(self):
        drop = lambda d: d.remove(next(x for x in d if x["kind"] == "NetworkPolicy" and x["metadata"]["name"] == "acme-solver-from-ingress-controller"))
        self.assertCaught(drop, "no NetworkPolicy lets the ingress controller reach the HTTP-01 solver pods on 8089")
        def wrong_port(d):
            p = next(x for x in d if x["kind"] == "NetworkPolicy" and x["metadata"]["name"] == "acme-solver-from-ingress-controller")
            p["spec"]["ingress"][0]["ports"][0]["port"] = 80
        self.assertCaught(wrong_port, "HTTP-01 solver pods on 8089")

    def test_an_overlapping_or_misscheduled_cronjob(self):
        self.assertCaught(lambda d: next(x for x in d if x["kind"] == "CronJob")["spec"].__setitem__("concurrencyPolicy", "Allow"), "concurrencyPolicy must be Forbid")
        self.assertCaught(lambda d: next(x for x in d if x["kind"] == "CronJob" and x["metadata"]["name"] == "astria-cleanup")["spec"].__setitem__("timeZone", "Europe/Berlin"), "cleanup must run Wednesdays")



# ------------------------------------------------------------------ scripts/deploy.sh

REGISTRY, VERSION = "registry.test/acme", "9.8.7"
PINNED = f"{REGISTRY}/astria-bot:{VERSION}"

# Stand-ins that record what they get: `spin` does nothing; `kubectl` renders with the real
# kubectl, answers `wait` and `api-resources` as a cluster with KEDA would, keeps a copy of
# every file it is asked to apply, and logs every call.
SPIN_STANDIN = """#!/bin/sh
echo "spin $*" >> "$DEPLOY_LOG"
"""
KUBECTL_STANDIN = """#!/bin/sh
echo "kubectl $*" >> "$DEPLOY_LOG"
case "$1" in
  kustomize) exec "$REAL_KUBECTL" "$@" ;;
  api-resources) printf 'horizontalpodautoscalers.autoscaling\nscaledobjects.keda.sh\n' ;;
  apply)
    n=$(ls "$DEPLOY_APPLIED" | wc -l)
    cp "$3" "$DEPLOY_APPLIED/$n.yaml" ;;
esac
"""


class TheDeployScript(unittest.TestCase):
    """scripts/deploy.sh in a copy of the repository, with stand-ins for spin and kubectl."""

    def setUp(self):
        self.tmp = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp)
        self.repo = self.tmp / "repo"
        (self.repo / "scripts").mkdir(parents=True)
        shutil.copytree(K8S, self.repo / "kubernetes")
        for script in ["deploy.sh", "dev-secrets.sh"]:
            shutil.copy(ROOT / "scripts" / script, self.repo / "scripts" / script)
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        for name, text in [("spin", SPIN_STANDIN), ("kubectl", KUBECTL_STANDIN)]:
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.applied = self.tmp / "applied"
        self.applied.mkdir()
        self.log = self.tmp / "calls.log"
        self.env = os.environ | {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "REAL_KUBECTL": shutil.which("kubectl"),
            "DEPLOY_LOG": str(self.log),
            "DEPLOY_APPLIED": str(self.applied),
        }

    def deploy(self, *args):
        return subprocess.run(["bash", "scripts/deploy.sh", *args], cwd=self.repo, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def calls(self):
        return self.log.read_text().splitlines() if self.log.exists() else []

    def plan(self, overlay):
        done = self.deploy("--dry-run", "--skip-checks", REGISTRY, VERSION, overlay)
        self.assertEqual(done.returncode, 0, done.stderr)
        plan = []
        for line in done.stdout.splitlines():
            if line.startswith("stage "):
                plan.append((line.split()[1].rstrip(":"), []))
            elif line.startswith("  ") and plan:
                kind, name = line.strip().split("/", 1)
                plan[-1][1].append((kind, name))
        return plan

    def test_every_overlay_is_applied_executor_first_and_autoscalers_last(self):
        for overlay in OVERLAYS:
            with self.subTest(overlay=overlay):
                plan = self.plan(overlay)
                self.assertEqual([s for s, _ in plan], ["1-foundation", "2-apps", "3-scaling"])
                self.assertEqual(manifest_checks.deploy_stage_problems(plan), [])
                # Nothing the overlay renders is left out of the plan.
                rendered = {(d["kind"], d["metadata"]["name"]) for d in render_in(self.repo, overlay)}
                self.assertEqual({o for _, objects in plan for o in objects}, rendered)

    def test_every_overlay_renders_the_pinned_image_after_a_deploy(self):
        done = self.deploy("--skip-checks", REGISTRY, VERSION, "production")
        self.assertEqual(done.returncode, 0, done.stderr)
        for overlay in OVERLAYS:
            with self.subTest(overlay=overlay):
                images = {d["spec"]["image"] for d in render_in(self.repo, overlay) if d["kind"] == "SpinApp"}
                self.assertEqual(images, {PINNED})

    def test_a_deploy_builds_pushes_and_applies_in_stages_waiting_between_them(self):
        done = self.deploy("--skip-checks", REGISTRY, VERSION, "production-keda")
        self.assertEqual(done.returncode, 0, done.stderr)
        calls = [c for c in self.calls() if not c.startswith("kubectl kustomize")]
        self.assertEqual(calls[:2], ["spin build", f"spin registry push {PINNED}"])
        applies = [i for i, c in enumerate(calls) if c.startswith("kubectl apply")]
        self.assertEqual(len(applies), 3, calls)
        kinds = [{d["kind"] for d in yaml.safe_load_all((self.applied / f"{n}.yaml").read_text()) if d} for n in range(3)]
        self.assertIn("SpinAppExecutor", kinds[0])
        self.assertEqual(kinds[1], {"SpinApp"})
        self.assertEqual(kinds[2], {"ScaledObject"})
        between = lambda a, b: calls[applies[a] + 1:applies[b]]
        self.assertEqual(between(0, 1), ["kubectl -n astria-bot wait --for=create spinappexecutor/containerd-shim-spin --timeout=60s"])
        waited = [c.split()[-2] for c in between(1, 2) if " wait " in c]
        self.assertEqual(sorted(waited), sorted(f"deployment/{d['metadata']['name']}" for d in render_in(self.repo, "production-keda") if d["kind"] == "SpinApp"))
        # Switching from HPAs: the old ones go first, or KEDA refuses each ScaledObject.
        self.assertIn("kubectl -n astria-bot delete horizontalpodautoscalers.autoscaling -l app.kubernetes.io/part-of=astria-bot --ignore-not-found", between(1, 2))

    def test_a_dry_run_builds_pushes_and_applies_nothing(self):
        self.assertEqual(self.deploy("--dry-run", "--skip-checks", REGISTRY, VERSION, "production").returncode, 0)
        self.assertFalse([c for c in self.calls() if not c.startswith("kubectl kustomize")])

    def test_an_overlay_the_pin_does_not_reach_is_refused_before_anything_is_applied(self):
        stray = self.repo / "kubernetes/overlays/stray"
        stray.mkdir()
        (stray / "kustomization.yaml").write_text(
            "resources: [../../base]\nimages:\n  - name: ghcr.io/astria-bot/astria-bot\n    newTag: 0.0.1\n")
        done = self.deploy("--skip-build", "--skip-checks", REGISTRY, VERSION, "stray")
        self.assertEqual(done.returncode, 1)
        self.assertIn("does not take the pinned image", done.stderr)
        self.assertFalse([c for c in self.calls() if c.startswith("kubectl apply")])

    def test_the_stage_rule_catches_an_executor_or_autoscaler_in_the_wrong_stage(self):
        plan = self.plan("production")
        late = [(s, [o for o in objs if o[0] != "SpinAppExecutor"] + ([("SpinAppExecutor", "x")] if s == "2-apps" else []))
                for s, objs in plan]
        self.assertIn("SpinAppExecutor/x is applied in stage 2-apps, not before every SpinApp",
                      manifest_checks.deploy_stage_problems(late))
        early = [(s, objs + ([("HorizontalPodAutoscaler", "y")] if s == "2-apps" else [])) for s, objs in plan]
        self.assertIn("HorizontalPodAutoscaler/y is applied in stage 2-apps, not after every SpinApp's Deployment",
                      manifest_checks.deploy_stage_problems(early))


def render_in(repo, overlay):
    out = subprocess.run(["kubectl", "kustomize", str(repo / "kubernetes/overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]

if __name__ == "__main__":
    unittest.main(verbosity=2)
