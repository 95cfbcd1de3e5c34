#!/usr/bin/env bash
# Sets up if needed, then runs the whole test suite: unit tests, loader fault
# tests, parity tests against Hugging Face transformers, cluster and chaos
# tests; then the Helm chart's checks (helm lint, offline schema validation,
# template tests) and its rendered pods run as podman containers of the
# image scripts/image.sh builds (as plain processes where podman cannot run,
# which the test prints); and tests/python: what official Python clients see
# (gRPC reflection through grpcio-reflection); then every fuzz target for a
# few seconds (scripts/fuzz.sh).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$LLMOS_ROOT"
# The CLI tests start the coordinator and worker binaries: build them all.
cargo build --release --workspace --bins
rc=0
cargo test --release --workspace "$@" || rc=$?

eval "$(bash scripts/helm-tools.sh --print-env)"
eval "$(bash scripts/image.sh --print-env)"
if ! LLMOS_IMAGE_SKIP_BUILD=1 bash scripts/image.sh; then
  echo "[test] the image could not be built here: the rendered pods run as plain processes" >&2
  export LLMOS_PODS_RUNTIME=process
fi
# -rA: the summaries (skipped kinds, runtime, timings) show in a passing run.
"$LLMOS_PYTHON" -m pytest -q -rA tests/helm tests/python || rc=$?
# The decoders of untrusted input under libFuzzer: a short run of every
# target (7 s each, about a minute), from the seeds and the cached corpus.
bash scripts/fuzz.sh "${LLMOS_FUZZ_SECONDS:-7}" || rc=$?
exit $rc
