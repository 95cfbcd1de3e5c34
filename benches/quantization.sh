#!/usr/bin/env bash
# Int8 weight-only quantization on CPU: prefill and batch-1 decode speed and
# peak memory of llmos-worker with int8 linear weights against the same
# model in bf16 and f32, in one run (2 threads), on the embedded SmolLM2 and
# a Llama-3.2-1B shape with synthetic weights. Quality cost: see
# tests/quantization.rs (perplexity and logit error against bf16).
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$LLMOS_ROOT"
cargo build --release -q -p llmos-worker
bin=$CARGO_TARGET_DIR/release/llmos-worker
for model in smollm2 synthetic:llama-3.2-1b; do
  decode=128
  [ "$model" = smollm2 ] || decode=48
  results=()
  for cfg in "f32 none" "bf16 none" "bf16 int8" "f32 int8"; do
    set -- $cfg
    results+=("$("$bin" bench --model "$model" --dtype "$1" --quantize "$2" --threads 2 \
      --prompt-tokens 256 --decode-tokens "$decode" --repeat 3 2>/dev/null)")
  done
  "$LLMOS_PYTHON" - "$model" "${results[@]}" <<'PY'
import json, sys
model, rows = sys.argv[1], [json.loads(r) for r in sys.argv[2:]]
print(f"\n{model} (2 threads, 256-token prompt)")
print(f"{'weights':<12}{'decode tok/s':>14}{'prefill tok/s':>15}{'peak RSS MB':>13}")
for r in rows:
    name = r["dtype"] + ("+int8" if r["quantization"] == "int8" else "")
    print(f"{name:<12}{r['decode_tokens_per_s']:>14.1f}{r['prefill_tokens_per_s']:>15.1f}{r['peak_rss_mb']:>13.0f}")
by = {(r["dtype"], r["quantization"]): r for r in rows}
q, b = by[("bf16", "int8")], by[("bf16", "none")]
print(f"bf16+int8 / bf16: decode {q['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x, "
      f"prefill {q['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x, "
      f"peak memory {q['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
PY
done
