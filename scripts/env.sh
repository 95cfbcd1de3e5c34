# Sourced by the scripts: runs the idempotent setup and exports its environment.
LLMOS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$(bash "$LLMOS_ROOT/scripts/setup.sh" --print-env)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$LLMOS_CACHE/target}
export CARGO_TERM_PROGRESS_WHEN=never
