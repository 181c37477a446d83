"""What a rendered overlay must satisfy before it may reach a cluster.

`problems(docs, app, secret_keys, bounds)` answers a list of human-readable problems (empty when
all is well) for the objects `kubectl kustomize` rendered, checked against `spin.toml` (`app`,
parsed) and the keys of `kubernetes/secrets.env.example`. Core objects are validated against the
Kubernetes schemas separately (kubernetes-validate); these are the rules only this project knows.
"""

import re

SPINAPP = "SpinApp"
EXECUTOR = "containerd-shim-spin"
IMAGE = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?/([a-z0-9._-]+/)*astria-bot:[0-9]+\.[0-9]+\.[0-9]+$")
PUBLIC_ROUTES = {"/SmsReceived", "/payment-received", "/pack-tune-received", "/update-images"}
VAR_REF = re.compile(r"\{\{\s*([a-z0-9_]+)\s*\}\}")


class App:
    """The parts of spin.toml the checks need."""

    def __init__(self, manifest):
        self.variables = manifest.get("variables", {})
        self.components = manifest.get("component", {})
        self.routes = {}
        for t in manifest.get("trigger", {}).get("http", []):
            route = t["route"]
            if isinstance(route, str):
                self.routes[route] = t["component"]

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

        # Probes: on a route that exists and that one of this SpinApp's components serves.
        for kind in ("readiness", "liveness"):
            path = spec.get("checks", {}).get(kind, {}).get("httpGet", {}).get("path")
            if not path:
                out.append(f"{where}: no {kind} probe")
                continue
            comp = app.component_for(path)
            if comp is None or comp not in components:
                out.append(f"{where}: {kind} probe {path} is not a route of its components")

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
        urls = [a for a in container.get("args", []) if a.startswith("http://")]
        for url in urls:
            m = re.match(r"^http://([a-z0-9-]+)(/.*)$", url)
            comp = app.component_for(m.group(2)) if m else None
            if not m or comp is None or owner.get(comp) != m.group(1):
                out.append(f"{where}: calls {url}, which no SpinApp serves")
            else:
                schedules[m.group(2)] = (spec.get("schedule"), spec.get("timeZone"))
        tokens = [e for e in container.get("env", []) if e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") == "admin_token"]
        if not tokens:
            out.append(f"{where}: does not take the admin token from the Secret")
    if schedules.get("/maintenance/run") != ("0 4 * * 3", "Etc/UTC"):
        out.append(f"cleanup must run Wednesdays 04:00 Etc/UTC, found {schedules.get('/maintenance/run')}")
    if (schedules.get("/maintenance/relay") or (None,))[0] != "* * * * *":
        out.append(f"relay must run every minute, found {schedules.get('/maintenance/relay')}")

    # One disruption budget per SpinApp, selecting its pods.
    budgets = {p["spec"]["selector"]["matchLabels"].get("core.spinkube.dev/app-name") for p in _by_kind(docs, "PodDisruptionBudget")}
    for sa in spinapps:
        if _name(sa) not in budgets:
            out.append(f"SpinApp {_name(sa)}: no PodDisruptionBudget selects its pods")
    return out
