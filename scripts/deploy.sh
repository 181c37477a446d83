#!/usr/bin/env bash
# From source to cluster: builds the app with Spin, pushes it as one OCI image, pins that image
# for every overlay, checks the overlays, and applies the chosen one in stages.
#   scripts/deploy.sh [--dry-run] <registry> <version> [overlay]   e.g. ghcr.io/acme 0.1.0 production
# Needs the Spin CLI (spin build, spin registry push, logged in to the registry) and kubectl
# (1.31 or later: `kubectl wait --for=create`) pointed at a cluster with SpinKube
# (kubernetes/README.md). Portable: POSIX awk, no GNU-only sed.
#
# Why stages: spin-operator's validating webhook refuses a SpinApp whose SpinAppExecutor it
# cannot yet see ("executor does not exist in namespace"), and KEDA's refuses a CPU
# ScaledObject whose Deployment does not exist yet (spin-operator creates it only after it
# admitted the SpinApp). One `kubectl apply -k` sends them all at once, SpinApps first. So:
#   1 foundation: everything but SpinApps and autoscalers (namespace, secrets' consumers,
#     config, the executor, policies, CronJobs, the edge, monitoring); then wait for the
#     executor to exist;
#   2 apps: the SpinApps (retried while the webhook's cache has not seen the executor); then
#     wait until spin-operator has created each SpinApp's Deployment;
#   3 scaling: HPAs or ScaledObjects, after deleting the other kind's (`kubectl apply` does not
#     prune, and KEDA refuses a ScaledObject whose Deployment an HPA already manages).
# Re-running it is safe: every stage is an apply. --dry-run renders, pins and prints the stages
# without building, pushing or applying anything.
#
# --skip-build and --skip-checks are for the script's own test (tests/kubernetes), which runs
# it with stand-ins for spin and kubectl from inside scripts/check-kubernetes.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
dry_run=false skip_build=false skip_checks=false
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=true; shift ;;
    --skip-build) skip_build=true; shift ;;
    --skip-checks) skip_checks=true; shift ;;
    *) break ;;
  esac
done
usage="usage: scripts/deploy.sh [--dry-run] <registry> <version> [overlay]"
registry=${1:?$usage}
version=${2:?$usage}
overlay=${3:-production}
ns=astria-bot
say() { echo "[deploy] $*" >&2; }
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  say "version must be x.y.z (got '$version'): images are never 'latest'"
  exit 2
fi
if ! [[ "$registry" =~ ^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*$ ]]; then
  say "registry must look like ghcr.io/acme (got '$registry')"
  exit 2
fi
[ -d "kubernetes/overlays/$overlay" ] || { say "no overlay kubernetes/overlays/$overlay"; exit 2; }
image="$registry/astria-bot:$version"

if ! $dry_run && ! $skip_build; then
  spin build
  spin registry push "$image"
fi

# Pin: every overlay takes its image from one kustomize Component, written whole (no in-place
# edit to go wrong, and the same on any Unix).
cat > kubernetes/image/kustomization.yaml <<EOF
# The image every overlay runs: written by scripts/deploy.sh (registry and version of the
# last deploy from this checkout). Overlays include it as a component.
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
images:
  - name: ghcr.io/astria-bot/astria-bot
    newName: $registry/astria-bot
    newTag: $version
EOF

# The dev overlay's secrets are made here, on the deploying machine, never committed.
[ "$overlay" != dev ] || bash scripts/dev-secrets.sh
$skip_checks || bash scripts/check-kubernetes.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kubectl kustomize "kubernetes/overlays/$overlay" > "$work/all.yaml"

# Refuse an overlay the pin did not reach: every SpinApp must run exactly $image.
spinapps=$(awk '/^kind: SpinApp$/ { n++ } END { print n + 0 }' "$work/all.yaml")
pinned=$(awk -v want="  image: $image" '$0 == want { n++ } END { print n + 0 }' "$work/all.yaml")
if [ "$spinapps" -eq 0 ] || [ "$pinned" -ne "$spinapps" ]; then
  say "overlay $overlay runs $pinned of its $spinapps SpinApps on $image: it does not take the pinned image"
  say "(include ../../image in its components, or build it on an overlay that does)"
  exit 1
fi

# Split the rendered overlay into the three stages by kind (see the top of this file).
awk -v dir="$work" '
  function flush() {
    if (doc == "") return
    stage = "1-foundation"
    if (kind == "SpinApp") stage = "2-apps"
    if (kind == "HorizontalPodAutoscaler" || kind == "ScaledObject") stage = "3-scaling"
    printf "---\n%s", doc > (dir "/" stage ".yaml")
    doc = ""; kind = ""
  }
  /^---$/ { flush(); next }
  /^kind: / { kind = $2 }
  { doc = doc $0 "\n" }
  END { flush() }
' "$work/all.yaml"
names() { # kind, stage file: the metadata.name of each object of that kind
  awk -v k="$1" '
    /^---$/ { kind = ""; inmeta = 0; next }
    /^kind: / { kind = $2 }
    /^metadata:/ { inmeta = 1; next }
    inmeta && /^  name: / { if (kind == k) print $2; inmeta = 0 }
    /^[a-z]/ && !/^metadata:/ { inmeta = 0 }
  ' "$2"
}
for s in 1-foundation 2-apps 3-scaling; do touch "$work/$s.yaml"; done
executors=$(names SpinAppExecutor "$work/1-foundation.yaml")
apps=$(names SpinApp "$work/2-apps.yaml")
scaling_kind=HorizontalPodAutoscaler other=scaledobjects.keda.sh
if grep -q '^kind: ScaledObject$' "$work/3-scaling.yaml"; then
  scaling_kind=ScaledObject other=horizontalpodautoscalers.autoscaling
fi

if $dry_run; then
  for s in 1-foundation 2-apps 3-scaling; do
    echo "stage $s:"
    awk '/^kind: / { kind = $2 } /^  name: / && kind != "" { print "  " kind "/" $2; kind = "" }' "$work/$s.yaml"
  done
  echo "then: delete $other objects of app.kubernetes.io/part-of=astria-bot before stage 3-scaling ($scaling_kind)"
  exit 0
fi

say "stage 1/3: foundation (namespace, config, executor, policies, CronJobs, edge, monitoring)"
kubectl apply -f "$work/1-foundation.yaml"
for e in $executors; do
  kubectl -n "$ns" wait --for=create "spinappexecutor/$e" --timeout=60s
done

say "stage 2/3: the SpinApps"
# spin-operator's webhook reads executors from its informer cache, which lags the apply above.
for attempt in 1 2 3 4 5 6; do
  if kubectl apply -f "$work/2-apps.yaml"; then break; fi
  [ "$attempt" -lt 6 ] || { say "the SpinApps were refused six times; see the errors above"; exit 1; }
  say "refused (the executor may not be in the operator's cache yet); trying again in 5 s"
  sleep 5
done
for a in $apps; do
  kubectl -n "$ns" wait --for=create "deployment/$a" --timeout=180s
done

say "stage 3/3: autoscaling ($scaling_kind)"
if kubectl api-resources -o name 2>/dev/null | grep -qx "$other"; then
  kubectl -n "$ns" delete "$other" -l app.kubernetes.io/part-of=astria-bot --ignore-not-found
fi
if [ -s "$work/3-scaling.yaml" ]; then
  kubectl apply -f "$work/3-scaling.yaml"
fi
say "$image applied with kubernetes/overlays/$overlay; watch: kubectl -n $ns get spinappexecutors,spinapps,pods"
