"""Every Kubernetes overlay, rendered with `kubectl kustomize`: core objects valid against the
Kubernetes schemas (kubernetes-validate, offline), SpinApps and their neighbours checked against
spin.toml (manifest_checks), and each check shown to catch the fault it is for.

Run by scripts/check-kubernetes.sh (part of scripts/test.sh).
"""

import copy
import pathlib
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
OVERLAYS = {"dev": DEV_BOUNDS, "production": PRODUCTION_BOUNDS, "production-keda": PRODUCTION_BOUNDS}
# Kinds whose schemas are not Kubernetes' own (checked by manifest_checks instead).
CUSTOM_KINDS = {"SpinApp", "ScaledObject"}


def render(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def secret_keys():
    keys = set()
    for line in (K8S / "secrets.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            keys.add(line.split("=", 1)[0])
    return keys


APP = manifest_checks.App(tomllib.loads((ROOT / "spin.toml").read_text()))


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

    def test_the_dev_secret_has_every_key_and_production_generates_none(self):
        dev = {d["metadata"]["name"]: d for d in render("dev") if d["kind"] == "Secret"}
        self.assertEqual(set(dev["astria-secrets"]["data"]), secret_keys())
        self.assertIn("runtime-config.toml", dev["astria-runtime-config"]["data"])
        self.assertEqual([d for d in render("production") if d["kind"] == "Secret"], [], "real secrets are created out of band")

    def test_keda_replaces_every_hpa(self):
        kinds = [d["kind"] for d in render("production-keda")]
        self.assertNotIn("HorizontalPodAutoscaler", kinds)
        self.assertEqual(kinds.count("ScaledObject"), 3)


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
        self.assertCaught(lambda d: self.spinapp(d, "astria-image")["spec"]["components"].remove("image-trainer"), "components in no SpinApp: image-trainer")
        self.assertCaught(lambda d: self.spinapp(d, "astria-payment")["spec"]["components"].append("image-trainer"), "also runs in SpinApp")

    def test_a_missing_secret_key(self):
        def typo(d):
            v = next(v for v in self.spinapp(d, "astria-payment")["spec"]["variables"] if v["name"] == "stripe_secret_key")
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
        self.assertCaught(lambda d: self.spinapp(d, "astria-image")["spec"]["checks"]["liveness"]["httpGet"].__setitem__("path", "/health/message"), "liveness probe /health/message")

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

    def test_an_overlapping_or_misscheduled_cronjob(self):
        self.assertCaught(lambda d: next(x for x in d if x["kind"] == "CronJob")["spec"].__setitem__("concurrencyPolicy", "Allow"), "concurrencyPolicy must be Forbid")
        self.assertCaught(lambda d: next(x for x in d if x["kind"] == "CronJob" and x["metadata"]["name"] == "astria-cleanup")["spec"].__setitem__("timeZone", "Europe/Berlin"), "cleanup must run Wednesdays")


if __name__ == "__main__":
    unittest.main(verbosity=2)
