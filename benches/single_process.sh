#!/usr/bin/env bash
# Single-process benchmark: llmos vs transformers vs llama.cpp on SmolLM2.
# Installs llama-cpp-python (builds llama.cpp from source, several minutes the
# first time) and converts the embedded GGUF to F32, BF16 and Q8_0 once, and
# the F32 one to llama.cpp's Q4_K_M with llama.cpp's quantizer; the embedded
# Q4_1 file itself is the Q4_1 row.
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$LLMOS_ROOT"
# llama.cpp's AMX backend (compiled in by -march=native where the CPU has
# AMX) segfaults in its first quantized matrix product on some Xeons
# (ggml-org/llama.cpp#20824; here on Q4_1 and Q8_0): build without it
# and rebuild a copy that has it.
if ! "$LLMOS_PYTHON" -c 'import llama_cpp, sys; sys.exit(b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info())' 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_ARGS="-DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'" \
    "$LLMOS_VENV/bin/pip" install -q --force-reinstall --no-deps --no-cache-dir llama-cpp-python
  # Its own dependencies (diskcache on a fresh venv), without rebuilding it
  # or replacing the venv's numpy.
  "$LLMOS_VENV/bin/pip" install -q llama-cpp-python
fi
cargo build --release -q -p llmos-worker
dir=$LLMOS_CACHE/bench
mkdir -p "$dir"
for k in f32 bf16 q8_0; do
  [ -f "$dir/smollm2-$k.gguf" ] || "$LLMOS_PYTHON" benches/convert_gguf.py "$LLMOS_SMOLLM2_GGUF" "$dir/smollm2-$k.gguf" $k
done
# llama.cpp's own Q4_K_M of the F32 file.
[ -f "$dir/smollm2-q4_k_m.gguf" ] || "$LLMOS_PYTHON" benches/convert_gguf.py "$dir/smollm2-f32.gguf" "$dir/smollm2-q4_k_m.gguf" q4_k_m
exec "$LLMOS_PYTHON" benches/single_process.py "$CARGO_TARGET_DIR/release/llmos-worker" \
  "$dir/smollm2-f32.gguf" "$dir/smollm2-bf16.gguf" --q4_1 "$LLMOS_SMOLLM2_GGUF" --q8_0 "$dir/smollm2-q8_0.gguf" \
  --q4_k_m "$dir/smollm2-q4_k_m.gguf" "$@"
