#!/usr/bin/env bash
# Checks every Kubernetes overlay before it can reach a cluster: renders it with
# `kubectl kustomize`, validates the core objects against the Kubernetes schemas offline
# (kubernetes-validate) and the SpinApps, Ingress and CronJobs against spin.toml
# (tests/kubernetes). Python packages go to a venv under target/; kubectl must be installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if ! command -v kubectl >/dev/null 2>&1; then
  echo "[k8s] kubectl (with its built-in kustomize) is needed: https://kubernetes.io/docs/tasks/tools/" >&2
  exit 1
fi
venv=target/k8s-venv
if ! "$venv/bin/python" -c "import kubernetes_validate, yaml" >/dev/null 2>&1; then
  echo "[k8s] installing kubernetes-validate into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 PyYAML==6.0.3
fi
"$venv/bin/python" tests/kubernetes/test_manifests.py
