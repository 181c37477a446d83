"""What a rendered overlay must satisfy before it may reach a cluster.

`problems(docs, app, secret_keys, bounds)` answers a list of human-readable problems (empty when
all is well) for the objects `kubectl kustomize` rendered, checked against `spin.toml` (`app`,
parsed) and the keys of `kubernetes/secrets.env.example`. Core objects are validated against the
Kubernetes schemas separately (kubernetes-validate), custom resources against their CRDs
(`schema_problems`), and the committed files for secrets (`committed_secret_problems`); the rest
are the rules only this project knows.
"""

import copy
import re

SPINAPP = "SpinApp"
EXECUTOR = "containerd-shim-spin"
IMAGE = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?/([a-z0-9._-]+/)*astria-bot:[0-9]+\.[0-9]+\.[0-9]+$")
PUBLIC_ROUTES = {"/SmsReceived", "/payment-received", "/pack-tune-received", "/update-images"}
VAR_REF = re.compile(r"\{\{\s*([a-z0-9_]+)\s*\}\}")
# Served by Spin itself, without calling any component or dependency.
SPIN_HEALTH = "/.well-known/spin/health"
# Where a SpinApp's pods say which SpinApp they belong to (spin-operator sets it).
APP_LABEL = "core.spinkube.dev/app-name"


class App:
    """The parts of spin.toml the checks need."""

    def __init__(self, manifest):
        self.variables = manifest.get("variables", {})
        self.components = manifest.get("component", {})
        self.routes = {}
        self.http_components = set()
        for t in manifest.get("trigger", {}).get("http", []):
            self.http_components.add(t["component"])
            route = t["route"]
            if isinstance(route, str):
                self.routes[route] = t["component"]
        self.redis_components = {t["component"] for t in manifest.get("trigger", {}).get("redis", [])}
        trigger_address = manifest.get("application", {}).get("trigger", {}).get("redis", {}).get("address", "")
        # Variables the Redis trigger's address needs: every SpinApp running a Redis-trigger
        # component must supply them.
        self.redis_trigger_variables = set(VAR_REF.findall(trigger_address))

    def component_for(self, path):
        """The component serving `path` (exact route first, then the longest wildcard)."""
        if path in self.routes:
            return self.routes[path]
        best = None
        for route, component in self.routes.items():
            if route.endswith("/...") and path.startswith(route[:-3]):
                if best is None or len(route) > len(best[0]):
                    best = (route, component)
        return best[1] if best else None

    def variables_of(self, component):
        """App variables a component needs: in its variables or allowed_outbound_hosts."""
        c = self.components.get(component, {})
        text = " ".join(list(c.get("variables", {}).values()) + list(c.get("allowed_outbound_hosts", [])))
        return set(VAR_REF.findall(text))


def _by_kind(docs, kind):
    return [d for d in docs if d and d.get("kind") == kind]


def _name(d):
    return d["metadata"]["name"]


def problems(docs, app, secret_keys, bounds=None):
    """`bounds`: {SpinApp name: (min, max)} the autoscalers must have, or None to skip."""
    out = []
    spinapps = _by_kind(docs, SPINAPP)
    if not spinapps:
        return ["no SpinApp rendered"]
    configmaps = {_name(c): c.get("data", {}) for c in _by_kind(docs, "ConfigMap")}
    autoscalers = {}
    for h in _by_kind(docs, "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        if ref.get("kind") == "Deployment":
            autoscalers[ref["name"]] = (h["spec"].get("minReplicas", 1), h["spec"]["maxReplicas"])
    for s in _by_kind(docs, "ScaledObject"):
        autoscalers[s["spec"]["scaleTargetRef"]["name"]] = (s["spec"].get("minReplicaCount", 0), s["spec"]["maxReplicaCount"])

    executors = {(_name(e), e["metadata"].get("namespace")) for e in _by_kind(docs, "SpinAppExecutor")}
    accounts = {(_name(a), a["metadata"].get("namespace")): a for a in _by_kind(docs, "ServiceAccount")}
    owner = {}
    images = set()
    for sa in spinapps:
        name, spec = _name(sa), sa["spec"]
        where = f"SpinApp {name}"
        images.add(spec.get("image", ""))
        if not IMAGE.match(spec.get("image", "")):
            out.append(f"{where}: image '{spec.get('image')}' is not <registry>/astria-bot:<x.y.z>")
        if spec.get("executor") != EXECUTOR:
            out.append(f"{where}: executor must be {EXECUTOR}")
        components = spec.get("components") or []
        if not components:
            out.append(f"{where}: lists no components (it would run all of them)")
        for c in components:
            if c not in app.components:
                out.append(f"{where}: component '{c}' is not in spin.toml")
            elif c in owner:
                out.append(f"{where}: component '{c}' also runs in SpinApp {owner[c]}")
            else:
                owner[c] = name

        # Variables: every binding names a real variable, secrets come from the Secret, and
        # what the components need without a usable default is supplied.
        bound = {}
        for v in spec.get("variables", []):
            var = v["name"]
            bound[var] = v
            if var not in app.variables:
                out.append(f"{where}: variable '{var}' is not declared in spin.toml")
            ref = v.get("valueFrom", {})
            if "secretKeyRef" in ref:
                key = ref["secretKeyRef"]["key"]
                if ref["secretKeyRef"].get("name") != "astria-secrets" or key not in secret_keys:
                    out.append(f"{where}: variable '{var}' reads secret key '{key}' missing from secrets.env.example")
            elif "configMapKeyRef" in ref:
                cm = ref["configMapKeyRef"]
                if cm["key"] not in configmaps.get(cm.get("name", ""), {}):
                    out.append(f"{where}: variable '{var}' reads ConfigMap key '{cm['key']}' that is not rendered")
            if app.variables.get(var, {}).get("secret") and "secretKeyRef" not in ref:
                out.append(f"{where}: secret variable '{var}' must come from a Secret, not a literal or ConfigMap")
        needed = set()
        for c in components:
            needed |= app.variables_of(c)
        for var in sorted(needed):
            decl = app.variables.get(var, {})
            if (decl.get("required") or decl.get("secret")) and var not in bound:
                out.append(f"{where}: variable '{var}' (required or secret) is not supplied")

        # HTTP and Redis-trigger components never share a SpinApp: Spin stops every trigger of a
        # process when its Redis trigger exits, which would take the webhooks down with Redis.
        http = [c for c in components if c in app.http_components]
        redis = [c for c in components if c in app.redis_components]
        if http and redis:
            out.append(f"{where}: mixes HTTP components ({', '.join(http)}) with Redis-trigger components ({', '.join(redis)})")
        if redis:
            for var in sorted(app.redis_trigger_variables - set(bound)):
                out.append(f"{where}: runs a Redis trigger but does not supply '{var}' (the trigger address)")
            # Each replica books the relay's heartbeat under its pod's name: the one that goes
            # deaf is named by it (astria_store::heartbeats, alert AstriaWorkerDeaf).
            named = next((v for v in spec.get("variables", []) if v["name"] == "replica_name"), {})
            if named.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
                out.append(f"{where}: runs a Redis trigger but does not name its replica (replica_name from the pod's metadata.name)")

        # Probes: liveness on Spin's own health route (a dependency outage must never restart
        # pods); readiness on a route one of this SpinApp's components serves. A SpinApp with no
        # HTTP component has no listener, so no probe can succeed there.
        checks = spec.get("checks", {})
        if not http:
            if checks:
                out.append(f"{where}: has probes but no HTTP component (Spin opens no listener)")
        else:
            for kind in ("readiness", "liveness"):
                path = checks.get(kind, {}).get("httpGet", {}).get("path")
                if not path:
                    out.append(f"{where}: no {kind} probe")
                    continue
                if kind == "liveness":
                    if path != SPIN_HEALTH:
                        out.append(f"{where}: liveness probe {path} may depend on a dependency; use {SPIN_HEALTH}")
                    continue
                comp = app.component_for(path)
                if comp is None or comp not in components:
                    out.append(f"{where}: {kind} probe {path} is not a route of its components")

        # The executor and the service account must exist in the SpinApp's own namespace
        # (spin-operator looks the executor up there and refuses the SpinApp otherwise).
        ns = sa["metadata"].get("namespace")
        executor = spec.get("executor")
        if (executor, ns) not in executors:
            out.append(f"{where}: executor '{executor}' has no SpinAppExecutor in namespace {ns}")
        account = spec.get("serviceAccountName")
        if not account:
            out.append(f"{where}: no serviceAccountName (the default account may mount a token)")
        elif (account, ns) not in accounts:
            out.append(f"{where}: service account '{account}' is not in namespace {ns}")
        elif accounts[(account, ns)].get("automountServiceAccountToken") is not False:
            out.append(f"{where}: service account '{account}' mounts its token (automountServiceAccountToken must be false)")

        # Scaling.
        if spec.get("enableAutoscaling"):
            if "replicas" in spec:
                out.append(f"{where}: replicas must be unset with enableAutoscaling")
            if name not in autoscalers:
                out.append(f"{where}: autoscaling on, but no HPA or ScaledObject targets Deployment {name}")
            elif bounds and name in bounds and autoscalers[name] != bounds[name]:
                out.append(f"{where}: autoscaler bounds {autoscalers[name]} differ from {bounds[name]}")
        elif name in autoscalers:
            out.append(f"{where}: an autoscaler targets it but enableAutoscaling is off")
        if not spec.get("runtimeConfig", {}).get("loadFromSecret"):
            out.append(f"{where}: no runtimeConfig.loadFromSecret")

    missing = sorted(set(app.components) - set(owner))
    if missing:
        out.append(f"components in no SpinApp: {', '.join(missing)}")
    if len(images) > 1:
        out.append(f"SpinApps run different images: {sorted(images)}")

    # Ingress: exactly the public routes, each to the SpinApp whose component serves it.
    exposed = set()
    for ing in _by_kind(docs, "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                path, service = p["path"], p["backend"]["service"]["name"]
                exposed.add(path)
                comp = app.component_for(path)
                if path not in PUBLIC_ROUTES:
                    out.append(f"Ingress exposes {path}, which is not a public webhook route")
                elif comp is None or owner.get(comp) != service:
                    out.append(f"Ingress sends {path} to {service}, but {owner.get(comp)} serves it")
    for route in sorted(PUBLIC_ROUTES - exposed):
        out.append(f"Ingress does not route {route}")

    # CronJobs: never overlapping, on the documented schedules, calling maintenance routes.
    schedules = {}
    for cj in _by_kind(docs, "CronJob"):
        spec = cj["spec"]
        where = f"CronJob {_name(cj)}"
        if spec.get("concurrencyPolicy") != "Forbid":
            out.append(f"{where}: concurrencyPolicy must be Forbid")
        container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        urls = [u for a in container.get("args", []) for u in re.findall(r"http://[^\s'\"]+", a)]
        for url in urls:
            m = re.match(r"^http://([a-z0-9-]+)(/.*)$", url)
            comp = app.component_for(m.group(2)) if m else None
            if not m or comp is None or owner.get(comp) != m.group(1):
                out.append(f"{where}: calls {url}, which no SpinApp serves")
            else:
                schedules[m.group(2)] = (spec.get("schedule"), spec.get("timeZone"))
        # The admin token comes from a mounted Secret file, never from the environment or the
        # command line (both show in `kubectl describe` or a process list).
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        mounted = [
            v for v in pod.get("volumes", [])
            if v.get("secret", {}).get("secretName") == "astria-secrets"
            and any(i.get("key") == "admin_token" for i in v["secret"].get("items", []))
        ]
        if not mounted:
            out.append(f"{where}: does not mount the admin token from the Secret")
        if any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") == "admin_token" for e in container.get("env", [])):
            out.append(f"{where}: passes the admin token in the environment")
        if pod.get("automountServiceAccountToken") is not False:
            out.append(f"{where}: mounts a service account token")
    if schedules.get("/maintenance/run") != ("0 4 * * 3", "Etc/UTC"):
        out.append(f"cleanup must run Wednesdays 04:00 Etc/UTC, found {schedules.get('/maintenance/run')}")
    if (schedules.get("/maintenance/relay") or (None,))[0] != "* * * * *":
        out.append(f"relay must run every minute, found {schedules.get('/maintenance/relay')}")

    # One disruption budget per SpinApp, selecting its pods.
    budgets = {p["spec"]["selector"]["matchLabels"].get("core.spinkube.dev/app-name") for p in _by_kind(docs, "PodDisruptionBudget")}
    for sa in spinapps:
        if _name(sa) not in budgets:
            out.append(f"SpinApp {_name(sa)}: no PodDisruptionBudget selects its pods")
    out.extend(solver_policy_problems(docs))
    out.extend(monitoring_label_problems(docs))
    return out


def monitoring_label_problems(docs):
    """Prometheus (kube-prometheus-stack) selects ServiceMonitors and PrometheusRules by the
    same release label: both must carry it, with the same value, or the scrape runs without
    its alerts (or the other way round)."""
    monitors, rules = _by_kind(docs, "ServiceMonitor"), _by_kind(docs, "PrometheusRule")
    if not monitors and not rules:
        return []
    out = []
    wanted = {(m["metadata"].get("labels") or {}).get("release") for m in monitors}
    for obj in monitors + rules:
        release = (obj["metadata"].get("labels") or {}).get("release")
        if release is None:
            out.append(f"{obj['kind']} {_name(obj)}: no release label for Prometheus to select it by")
        elif release not in wanted or len(wanted) != 1:
            out.append(f"{obj['kind']} {_name(obj)}: release label {release!r}, the ServiceMonitor has {sorted(map(str, wanted))}")
    return out


# cert-manager's HTTP-01 solver: pods with this label, listening on this port, created in the
# namespace of the Ingress that asks for the certificate (pkg/issuer/acme/http/pod.go).
SOLVER_LABELS = {"acme.cert-manager.io/http01-solver": "true"}
SOLVER_PORT = 8089


def solver_policy_problems(docs):
    """An Ingress that asks cert-manager for its certificate, in a namespace whose policies deny
    by default, needs a policy letting the ingress controller reach the HTTP-01 solver pods, or
    the challenge never answers and the certificate never issues (cert-manager#2334)."""
    asks = [i for i in _by_kind(docs, "Ingress")
            if {"cert-manager.io/cluster-issuer", "cert-manager.io/issuer"} & set(i["metadata"].get("annotations", {}))]
    if not asks:
        return []
    for p in _by_kind(docs, "NetworkPolicy"):
        if not p["spec"].get("podSelector") or not _selects(p["spec"]["podSelector"], SOLVER_LABELS):
            continue
        for rule in p["spec"].get("ingress", []) or []:
            from_controller = any(
                peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "ingress-nginx"
                for peer in rule.get("from", []) or [])
            on_port = any(port.get("port") == SOLVER_PORT for port in rule.get("ports", []) or [])
            if from_controller and on_port:
                return []
    names = ", ".join(_name(i) for i in asks)
    return [f"Ingress {names} asks cert-manager for a certificate, but no NetworkPolicy lets the ingress controller reach the HTTP-01 solver pods on {SOLVER_PORT}"]


def ingress_policy_problems(docs, expected):
    """`expected`: {SpinApp name: set of allowed-source descriptions}. A default-deny policy must
    select every pod; then each SpinApp may be reached only from the sources listed for it
    (a description is `namespace=<ns>` or `pods=<label>=<value>`)."""
    out = []
    policies = _by_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"].get("podSelector") == {} and set(p["spec"].get("policyTypes", [])) >= {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    if not deny:
        out.append("no default-deny NetworkPolicy (ingress and egress) for the namespace")
    for sa in _by_kind(docs, SPINAPP):
        name = _name(sa)
        labels = {APP_LABEL: name}
        sources = set()
        for p in policies:
            if not _selects(p["spec"].get("podSelector", {}), labels):
                continue
            for rule in p["spec"].get("ingress", []) or []:
                peers = rule.get("from")
                if not peers:
                    sources.add("anyone")
                for peer in peers or []:
                    if "namespaceSelector" in peer:
                        ns = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name", "any namespace")
                        sources.add(f"namespace={ns}")
                    elif "podSelector" in peer:
                        ml = peer["podSelector"].get("matchLabels", {})
                        sources.add("pods=" + ",".join(f"{k}={v}" for k, v in sorted(ml.items())) if ml else "pods=any")
                    else:
                        sources.add("ipBlock")
        want = expected.get(name, set())
        if sources != want:
            out.append(f"SpinApp {name}: ingress allowed from {sorted(sources) or 'nobody'}, expected {sorted(want) or 'nobody'}")
    return out


def _selects(selector, labels):
    """Whether a label selector (matchLabels and matchExpressions) selects `labels`."""
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        op, key, values = e["operator"], e["key"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def body_limit_problems(docs, largest_body):
    """Every Ingress admits the largest body the app itself accepts (nginx refuses more than 1m
    by default, before the app can answer)."""
    out = []
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    for ing in _by_kind(docs, "Ingress"):
        value = ing["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/proxy-body-size")
        m = re.fullmatch(r"(\d+)([kmg]?)", (value or "").lower())
        limit = int(m.group(1)) * units.get(m.group(2), 1) if m else None
        if value == "0":
            continue  # unlimited
        if limit is None or limit < largest_body:
            out.append(f"Ingress {_name(ing)}: body limit {value or 'nginx default 1m'} is below the app's largest accepted body ({largest_body} bytes)")
    return out


def strict_schema(schema):
    """A copy of an OpenAPI v3 schema in which objects accept only the properties they declare
    (what `kubectl apply --validate=strict` does), except where the schema preserves unknown
    fields or describes a map."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(schema)
    # Kubernetes fills metadata in; the CRDs leave it open.
    schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
    return schema


def schema_problems(docs, schemas):
    """Validates the custom resources (`schemas`: {kind: strict JSON schema}) and reports every
    error with its path."""
    import jsonschema

    out = []
    for d in docs:
        schema = schemas.get(d.get("kind"))
        if schema is None:
            continue
        for err in jsonschema.Draft202012Validator(schema).iter_errors(d):
            path = "/".join(str(p) for p in err.absolute_path)
            out.append(f"{d['kind']} {_name(d)}: {path or '(root)'}: {err.message}")
    return out


SECRET_ENV = re.compile(r"^\s*([a-z0-9_]+)\s*=\s*(\S+)", re.M)


def committed_secret_problems(files, secret_keys, example="kubernetes/secrets.env.example"):
    """`files`: {path: text} of every committed file under kubernetes/. No Secret value may be
    committed outside the placeholder example: no env file naming a secret key, no Secret
    object with data, no secretGenerator literal."""
    import yaml

    out = []
    for path, text in sorted(files.items()):
        if path == example:
            continue
        if path.endswith(".env") or path.endswith(".env.txt"):
            keys = {k for k, _ in SECRET_ENV.findall(text)} & secret_keys
            if keys:
                out.append(f"{path}: commits values for secret keys {sorted(keys)}")
        if path.endswith((".yaml", ".yml")):
            try:
                docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
            except yaml.YAMLError:
                continue
            for d in docs:
                if d.get("kind") == "Secret" and (d.get("data") or d.get("stringData")):
                    out.append(f"{path}: commits Secret {d.get('metadata', {}).get('name')} with values")
                for g in d.get("secretGenerator", []) or []:
                    if g.get("literals"):
                        out.append(f"{path}: secretGenerator {g.get('name')} commits literal values")
    return out


def deploy_stage_problems(plan):
    """`plan`: [(stage, [(kind, name), ...]), ...] as `scripts/deploy.sh --dry-run` prints it.
    The executor must be applied in an earlier stage than any SpinApp (spin-operator's webhook
    refuses a SpinApp whose executor it cannot see), autoscalers after every SpinApp (KEDA's
    webhook refuses a CPU ScaledObject whose Deployment spin-operator has not made yet), and
    every object in exactly one stage."""
    found = []
    stage_of = {}
    for index, (stage, objects) in enumerate(plan):
        for kind, name in objects:
            if (kind, name) in stage_of:
                found.append(f"{kind}/{name} is in two stages")
            stage_of[(kind, name)] = (index, stage)
    def stages(kind):
        return [(i, s, n) for (k, n), (i, s) in stage_of.items() if k == kind]
    apps = stages("SpinApp")
    if not apps:
        found.append("no stage applies a SpinApp")
    first_app = min((i for i, _, _ in apps), default=0)
    last_app = max((i for i, _, _ in apps), default=0)
    for i, s, n in stages("SpinAppExecutor"):
        if i >= first_app:
            found.append(f"SpinAppExecutor/{n} is applied in stage {s}, not before every SpinApp")
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for i, s, n in stages(kind):
            if i <= last_app:
                found.append(f"{kind}/{n} is applied in stage {s}, not after every SpinApp's Deployment")
    return found
