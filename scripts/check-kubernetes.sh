#!/usr/bin/env bash
# Checks every Kubernetes overlay before it can reach a cluster: renders it with
# `kubectl kustomize`, validates the core objects against the Kubernetes schemas offline
# (kubernetes-validate), SpinApp, SpinAppExecutor, ScaledObject, ServiceMonitor and
# PrometheusRule against their CRDs (unknown fields are errors), the SpinApps, Ingress, CronJobs,
# network policies and monitoring against spin.toml and the project's rules, and the alert rules
# with `promtool test rules` (tests/kubernetes). Python packages go to a venv under target/.
# kubectl must be installed (it is on the project's machines). The dev overlay's secrets are generated first
# (scripts/dev-secrets.sh), as a deployment would.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if ! command -v kubectl >/dev/null 2>&1; then
  # The project's machines ship kubectl 1.32 (kustomize v5); Debian's own kubernetes-client is
  # too old for these kustomizations, so there is nothing sensible to install here.
  echo "[k8s] kubectl (with its built-in kustomize v5) is needed: https://kubernetes.io/docs/tasks/tools/" >&2
  exit 1
fi
venv=target/k8s-venv
if ! "$venv/bin/python" -c "import kubernetes_validate, yaml, jsonschema, cloudcoil.models.keda, cloudcoil.models.prometheus_operator" >/dev/null 2>&1; then
  echo "[k8s] installing kubernetes-validate, jsonschema, KEDA's and the Prometheus Operator's models into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 PyYAML==6.0.3 \
    jsonschema==4.25.1 cloudcoil-models-keda==2.16.1.0 cloudcoil-models-prometheus-operator==0.80.1.0
fi
# promtool (Debian's prometheus package) runs the alert rules' unit tests
# (tests/kubernetes/alerts.test.yaml). Where it cannot be installed, the rules are checked by
# schema only and the promtool tests say they were skipped.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo -n"
  echo "[k8s] installing Debian's prometheus for promtool" >&2
  if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq \
      --no-install-recommends prometheus; } >/tmp/check-kubernetes-promtool.log 2>&1; then
    echo "[k8s] could not install prometheus (see /tmp/check-kubernetes-promtool.log)" >&2
  fi
fi
bash scripts/dev-secrets.sh
"$venv/bin/python" tests/kubernetes/test_manifests.py
