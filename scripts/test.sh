#!/usr/bin/env bash
# Sets up if needed, then runs the whole test suite: unit tests, loader fault
# tests and parity tests against Hugging Face transformers.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$LLMOS_ROOT"
# The CLI tests start the coordinator and worker binaries: build them all.
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
