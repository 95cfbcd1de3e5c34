#!/usr/bin/env bash
# The main job: set up if needed, build, start a local cluster (a
# coordinator and two worker processes on loopback, ports chosen
# automatically), deploy the embedded SmolLM2 split across both workers, and
# stream a generation; then keep serving (the endpoint and commands to try
# are printed) until Ctrl-C stops everything. Extra arguments go to
# `llmos local` (e.g. --prompt "..." --max-tokens 64 --temperature 0.7 --json,
# or --once to stop after the generation).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$LLMOS_ROOT"
cargo build --release -q -p llmos -p llmos-coordinator -p llmos-worker
# The default prompt (96 tokens unless --max-tokens says) where the
# arguments give none: `--once` or `--temperature 0.7` alone still have one.
args=("$@")
case " $* " in
  *" --prompt "* | *" --prompt="*) ;;
  *" --max-tokens "* | *" --max-tokens="*) args=(--prompt "Explain in two sentences why the sky is blue." "${args[@]}") ;;
  *) args=(--prompt "Explain in two sentences why the sky is blue." --max-tokens 96 "${args[@]}") ;;
esac
exec "$CARGO_TARGET_DIR/release/llmos" local "${args[@]}"
