#!/usr/bin/env bash
# Single-process benchmark: llmos vs transformers vs llama.cpp on SmolLM2.
# Installs llama-cpp-python (builds llama.cpp from source, several minutes the
# first time) and converts the embedded GGUF to F32, BF16 and Q8_0 once; the
# embedded Q4_1 file itself is the Q4_1 row.
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$LLMOS_ROOT"
"$LLMOS_PYTHON" -c 'import llama_cpp' 2>/dev/null || "$LLMOS_VENV/bin/pip" install -q llama-cpp-python
cargo build --release -q -p llmos-worker
dir=$LLMOS_CACHE/bench
mkdir -p "$dir"
for k in f32 bf16 q8_0; do
  [ -f "$dir/smollm2-$k.gguf" ] || "$LLMOS_PYTHON" benches/convert_gguf.py "$LLMOS_SMOLLM2_GGUF" "$dir/smollm2-$k.gguf" $k
done
exec "$LLMOS_PYTHON" benches/single_process.py "$CARGO_TARGET_DIR/release/llmos-worker" \
  "$dir/smollm2-f32.gguf" "$dir/smollm2-bf16.gguf" --q4_1 "$LLMOS_SMOLLM2_GGUF" --q8_0 "$dir/smollm2-q8_0.gguf" "$@"
