#!/usr/bin/env bash
# From source to cluster: builds the app with Spin, pushes it as one OCI image, pins that image
# in the overlay, checks the overlays, and applies it.
#   scripts/deploy.sh <registry> <version> [overlay]      e.g. ghcr.io/acme 0.1.0 production
# Needs the Spin CLI (spin build, spin registry push, logged in to the registry) and kubectl
# pointed at a cluster with SpinKube (kubernetes/README.md).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
registry=${1:?usage: scripts/deploy.sh <registry> <version> [overlay]}
version=${2:?usage: scripts/deploy.sh <registry> <version> [overlay]}
overlay=${3:-production}
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "[deploy] version must be x.y.z (got '$version'): images are never 'latest'" >&2
  exit 2
fi
image="$registry/astria-bot:$version"
spin build
spin registry push "$image"
if command -v kustomize >/dev/null 2>&1; then
  (cd "kubernetes/overlays/$overlay" && kustomize edit set image "ghcr.io/astria-bot/astria-bot=$image")
else
  # kubectl has no `kustomize edit`: set the overlay's one image entry in place.
  sed -i -E "s#^(\s+newName: ).*#\1$registry/astria-bot#; s#^(\s+newTag: ).*#\1$version#" \
    "kubernetes/overlays/$overlay/kustomization.yaml"
  grep -q "newName: $registry/astria-bot" "kubernetes/overlays/$overlay/kustomization.yaml" \
    || sed -i -E "s#^(\s+newTag: .*)#    newName: $registry/astria-bot\n\1#" "kubernetes/overlays/$overlay/kustomization.yaml"
fi
# The dev overlay's secrets are made here, on the deploying machine, never committed.
[ "$overlay" != dev ] || bash scripts/dev-secrets.sh
bash scripts/check-kubernetes.sh
kubectl apply -k "kubernetes/overlays/$overlay"
echo "[deploy] $image applied with kubernetes/overlays/$overlay; watch: kubectl -n astria-bot get spinappexecutors,spinapps,pods" >&2
