#!/usr/bin/env bash
# The main job: set up if needed, build, and stream a generation from the
# embedded SmolLM2 model. Extra arguments go to `llmos-worker generate`
# (e.g. --prompt "..." --max-tokens 64 --temperature 0.7 --json).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$LLMOS_ROOT"
cargo build --release -q -p llmos-worker
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--prompt "Explain in two sentences why the sky is blue." --max-tokens 96)
fi
exec "$CARGO_TARGET_DIR/release/llmos-worker" generate --model smollm2 "${args[@]}"
