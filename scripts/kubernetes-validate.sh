#!/usr/bin/env bash
# Validates the Kubernetes manifests against the API schemas of Kubernetes 1.29 to 1.33,
# offline and strict (unknown fields refused), with kubernetes-validate (PyPI) in a venv under
# target/. Checks what `kubectl apply -k deploy/kubernetes` would send (the kustomize output,
# generated ConfigMap included) plus the two files applied by hand. The ServiceMonitor is a
# CRD the tool has no schema for: warned about, not failed. Needs kubectl (kustomize built in).
# Knobs: VERSIONS (default "1.29 1.30 1.31 1.32 1.33"), KUBERNETES_VALIDATE_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${KUBERNETES_VALIDATE_VENV:-target/kubernetes-validate-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv" || { echo "python3-venv missing: apt-get install -y python3-venv" >&2; exit 1; }
  "$venv/bin/pip" install -q 'kubernetes-validate>=1.31'
fi
command -v kubectl >/dev/null 2>&1 || { echo "kubectl missing (it renders deploy/kubernetes with kustomize)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kubectl kustomize deploy/kubernetes > "$work/rendered.yaml"
for v in ${VERSIONS:-1.29 1.30 1.31 1.32 1.33}; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v.0" "$work/rendered.yaml" \
    deploy/kubernetes/secret.example.yaml deploy/kubernetes/servicemonitor.yaml
  echo "kubernetes $v: deploy/kubernetes valid"
done
