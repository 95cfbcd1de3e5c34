#!/usr/bin/env bash
# Builds the llmos container image with podman, with no registry: the base
# is a Debian root filesystem made by debootstrap from Debian's packages
# (cached in $LLMOS_CACHE/image), imported as localhost/llmos-base:bookworm;
# container/Containerfile then adds the release binaries, the libtorch
# libraries the worker links and the embedded SmolLM2.
#
#   bash scripts/image.sh [--cuda] [--tag TAG]     -> localhost/llmos:TAG (default 0.1.0)
#
# On these machines podman runs as root with the runc runtime, the cgroupfs
# cgroup manager and no default ulimits (crun fails on hybrid cgroups and on
# ulimits): the script writes that into a containers.conf and points
# CONTAINERS_CONF at it; `eval "$(bash scripts/image.sh --print-env)"` sets
# CONTAINERS_CONF and LLMOS_IMAGE for running the image (and builds nothing).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LLMOS_CACHE=${LLMOS_CACHE:-$HOME/.cache/llmos}
IMAGE_CACHE=$LLMOS_CACHE/image
SUITE=bookworm
MIRROR=${LLMOS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/llmos-base:$SUITE
VARIANT=cpu
TAG=0.1.0
PRINT_ENV=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) VARIANT=cuda ;;
    --tag) TAG=$2; shift ;;
    --print-env) PRINT_ENV=1 ;;
    *) echo "image.sh: unknown argument $1 (use --cuda, --tag TAG, --print-env)" >&2; exit 2 ;;
  esac
  shift
done
IMAGE=localhost/llmos:$TAG
[ "$VARIANT" = cuda ] && IMAGE=localhost/llmos:$TAG-cuda
log() { echo "[image] $*" >&2; }

# --- podman and its configuration for this kind of machine ---------------
need=()
for c in podman buildah runc debootstrap; do command -v $c >/dev/null 2>&1 || need+=($c); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq podman buildah runc debootstrap >&2
fi
mkdir -p "$IMAGE_CACHE"
CONF=$IMAGE_CACHE/containers.conf
cat > "$CONF" <<CONF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF=$CONF
if [ $PRINT_ENV = 1 ]; then
  # Only what a caller needs to run the image; nothing is built.
  echo "export CONTAINERS_CONF=\"$CONF\""
  echo "export LLMOS_IMAGE=\"$IMAGE\""
  exit 0
fi

# --- the base: debootstrap once, import once -----------------------------
ROOTFS_TAR=$IMAGE_CACHE/rootfs-$SUITE.tar
if [ ! -f "$ROOTFS_TAR" ]; then
  t0=$(date +%s)
  log "debootstrap --variant=minbase $SUITE from $MIRROR (once; cached in $IMAGE_CACHE)"
  DIR=$(mktemp -d "$IMAGE_CACHE/rootfs.XXXX")
  debootstrap --variant=minbase "$SUITE" "$DIR" "$MIRROR" >&2
  rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/lib/apt/lists/*
  tar -C "$DIR" -cf "$ROOTFS_TAR.tmp" .
  mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  rm -rf "$DIR"
  log "base root filesystem in $(( $(date +%s) - t0 )) s"
fi
if ! podman image exists "$BASE"; then
  log "importing $BASE"
  podman import --quiet "$ROOTFS_TAR" "$BASE" >&2
fi

# --- the build context ----------------------------------------------------
eval "$(bash "$ROOT/scripts/setup.sh" --print-env)"
TARGET=${CARGO_TARGET_DIR:-$LLMOS_CACHE/target}
if [ "${LLMOS_IMAGE_SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --workspace --bins >&2)
fi
CTX=$IMAGE_CACHE/context-$VARIANT
rm -rf "$CTX"; mkdir -p "$CTX/bin" "$CTX/lib" "$CTX/models"
for b in llmos llmos-coordinator llmos-worker; do
  strip -o "$CTX/bin/$b" "$TARGET/release/$b"
done
# Every library the worker links from the venv (libtorch, its OpenMP and
# the CUDA runtime stubs libtorch_cpu names), resolved by ldd.
ldd "$CTX/bin/llmos-worker" | awk '/=> \// {print $3}' | grep "$LLMOS_VENV" | while read -r lib; do
  cp -L "$lib" "$CTX/lib/"
done
if [ "$VARIANT" = cuda ]; then
  # What the CUDA path dlopens: libtorch_cuda (RTLD_GLOBAL, in kernels),
  # and the NVIDIA runtime libraries (cuBLAS, cuDNN, NCCL, NVRTC, ...).
  SITE=$("$LLMOS_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp -L "$SITE"/torch/lib/libtorch_cuda.so "$SITE"/torch/lib/libc10_cuda.so "$CTX/lib/"
  for d in "$SITE"/nvidia/*/lib "$SITE"/nvidia/cu13/lib; do
    [ -d "$d" ] && cp -L "$d"/*.so* "$CTX/lib/" 2>/dev/null || true
  done
fi
cp -L "$LLMOS_SMOLLM2_GGUF" "$CTX/models/"
cp "$ROOT/container/Containerfile" "$CTX/Containerfile"

t0=$(date +%s)
log "building $IMAGE ($VARIANT)"
podman build --quiet --build-arg BASE="$BASE" --build-arg VARIANT="$VARIANT" \
  -t "$IMAGE" -f "$CTX/Containerfile" "$CTX" >&2
# The check stage and earlier builds of this tag are left untagged: drop them.
podman image prune -f >/dev/null 2>&1 || true
SIZE=$(podman image inspect "$IMAGE" --format '{{.Size}}')
log "built $IMAGE in $(( $(date +%s) - t0 )) s: $(( SIZE / 1000000 )) MB"
