"""Single-process benchmark on SmolLM2: prefill of a 512-token prompt and
batch-1 greedy decode, for llmos, Hugging Face transformers and llama.cpp, in
float32 and bfloat16, with the same thread count, in one run, the engines
taking turns round by round. Prints every figure (medians over rounds) and
the ratios.

With --q4_1/--q8_0/--q4_k_m, rows for those GGUF files too: llmos executes their
blocks (`--quantize file`, f32 activations, an f16 KV cache as llama.cpp
keeps in every row: `--quantized-kv`), llama.cpp runs the same file,
transformers its dequantized f32 weights. Each engine's peak RSS is
measured in a process of its own (one load and a short run) after the
rounds. llmos also runs on 1 thread in every round: its decode gain from 1
to N threads is printed against a plain memory read's (measured by
`llmos-worker bench`).

Usage: single_process.py LLMOS_BIN F32_GGUF BF16_GGUF [--q4_1 GGUF] [--q8_0 GGUF] [--q4_k_m GGUF]
                         [--threads 2] [--prompt 512] [--decode 128] [--repeat 5]
                         [--baseline OTHER_LLMOS_BIN] [--quantized-kv f16|bf16|f32]

With --baseline, a second llmos binary (e.g. built from an earlier commit)
takes its turn in every round too, and the ratios of llmos to it are
printed: a before/after comparison on the same machine in the same minutes.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import time

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("llmos_bin")
p.add_argument("f32_gguf")
p.add_argument("bf16_gguf")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--prompt", type=int, default=512)
p.add_argument("--decode", type=int, default=128)
p.add_argument("--repeat", type=int, default=5)
p.add_argument("--baseline", default=None, help="another llmos-worker binary to compare with")
p.add_argument("--q4_1", default=None, help="a Q4_1 GGUF of the model")
p.add_argument("--q8_0", default=None, help="a Q8_0 GGUF of the model")
p.add_argument("--q4_k_m", default=None, help="llama.cpp's Q4_K_M GGUF of the model")
p.add_argument("--quantized-kv", default="f16", choices=["f16", "bf16", "f32"],
               help="llmos' KV cache dtype in the quantized rows (f16: llama.cpp's, which it keeps in every row)")
p.add_argument("--rss", nargs=3, metavar=("ENGINE", "DTYPE", "GGUF"), default=None,
               help="(internal) load one peer engine, run it briefly, print its peak RSS in MB")
args = p.parse_args()


def prompt_ids(vocab):
    # The same LCG as `llmos-worker bench`, so every engine sees the same prompt.
    x, out = 0x2545F4914F6CDD1D, []
    for _ in range(args.prompt):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((x >> 33) % vocab)
    return out


def report(engine, dtype, prefill_s, decode_tps):
    return {
        "engine": engine,
        "dtype": dtype,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": args.prompt / prefill_s,
        "decode_tokens_per_s": decode_tps,
    }


# Per row: the dtype llmos and transformers compute in, llmos' --quantize and
# --kv-dtype (auto: the model's dtype).
QKV = args.quantized_kv
KINDS = {"f32": ("f32", "none", "auto"), "bf16": ("bf16", "none", "auto"), "q4_1": ("f32", "file", QKV),
         "q8_0": ("f32", "file", QKV), "q4_k_m": ("f32", "file", QKV)}
last_llmos = {}
# Every plain memory read the current binary's runs measured, per file:
# {threads: [GB/s, ...]} (each run reads with 1 thread and with its own).
reads_by_file = {}


def llmos(dtype, gguf, binary=None, threads=None):
    """One run of `llmos-worker bench` (its own warm-up, one timed run)."""
    compute, quantize, kv = KINDS[dtype]
    out = subprocess.run(
        [binary or args.llmos_bin, "bench", "--model", gguf, "--dtype", compute, "--quantize", quantize,
         "--kv-dtype", kv, "--threads", str(threads or args.threads),
         "--prompt-tokens", str(args.prompt), "--decode-tokens", str(args.decode), "--repeat", "1"],
        check=True, capture_output=True, text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    last_llmos[(dtype, threads or args.threads, binary)] = r
    if binary is None:
        for n, gbs in r["memory_read_gb_per_s"].items():
            reads_by_file.setdefault(dtype, {}).setdefault(n, []).append(gbs)
    return r["prefill_s"], r["decode_tokens_per_s"]


def transformers_engine(dtype, gguf):
    # Imported here, so a llama.cpp-only process (peak RSS) has no torch.
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)

    d, f = os.path.split(gguf)
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).to(tdt).eval()
    ids = torch.tensor([prompt_ids(model.config.vocab_size)])

    @torch.no_grad()
    def once(n):
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(n):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, n / (time.perf_counter() - t1)

    once(4)
    return once


def llama_cpp_engine(dtype, gguf):
    from llama_cpp import Llama

    # Logit rows are kept for n_batch positions: make it the whole context.
    n_ctx = args.prompt + args.decode + 16
    # Its default KV cache, f16 (GGML_TYPE_F16 = 1), named.
    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, type_k=1, type_v=1,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    ids = prompt_ids(llm.n_vocab())

    def once(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return t1 - t0, n / (time.perf_counter() - t1)

    once(4)
    return once


# This machine's speed drifts by 10-20% over minutes, so the engines take
# turns: each round runs every engine once, and each figure is the median
# over rounds (running one engine's repeats, then the next's, would charge
# the drift to whichever ran in the slow minutes).
if args.rss:
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak
    # across fork and exec into the child's ru_maxrss.
    engine, dtype, gguf = args.rss
    once = (transformers_engine if engine == "transformers" else llama_cpp_engine)(dtype, gguf)
    once(16)
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    print(hwm / 1024)
    raise SystemExit(0)


def peer_rss(engine, dtype, gguf):
    out = subprocess.run([os.sys.executable, __file__, args.llmos_bin, args.f32_gguf, args.bf16_gguf,
                          "--threads", str(args.threads), "--prompt", str(args.prompt), "--rss", engine, dtype, gguf],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


files = [("f32", args.f32_gguf), ("bf16", args.bf16_gguf)]
files += [(k, f) for k, f in (("q4_1", args.q4_1), ("q8_0", args.q8_0), ("q4_k_m", args.q4_k_m)) if f]
rows = []
for dtype, gguf in files:
    engines = {
        "llmos": lambda n, dtype=dtype, gguf=gguf: llmos(dtype, gguf),
        "llmos 1 thread": lambda n, dtype=dtype, gguf=gguf: llmos(dtype, gguf, threads=1),
        "transformers": transformers_engine(dtype, gguf),
        "llama.cpp": llama_cpp_engine(dtype, gguf),
    }
    if args.baseline:
        try:  # An older binary may not read this file's types.
            llmos(dtype, gguf, args.baseline)
            engines["llmos-baseline"] = lambda n, dtype=dtype, gguf=gguf: llmos(dtype, gguf, args.baseline)
        except subprocess.CalledProcessError as e:
            print(f"the baseline binary cannot run {gguf} ({e.stderr.strip().splitlines()[-1:]}): no baseline row for {dtype}")
    runs = {name: [] for name in engines}
    for _ in range(args.repeat):
        for name, once in engines.items():
            runs[name].append(once(args.decode))
    for name, r in runs.items():
        rows.append(report(name, dtype, statistics.median(x[0] for x in r),
                           statistics.median(x[1] for x in r)))
    del engines
    gc.collect()
    for row in rows:
        if row["dtype"] != dtype:
            continue
        if row["engine"] == "llmos":
            row["peak_rss_mb"] = last_llmos[(dtype, args.threads, None)]["peak_rss_mb"]
        elif row["engine"] in ("transformers", "llama.cpp"):
            row["peak_rss_mb"] = peer_rss(row["engine"], dtype, gguf)

print(f"\nSmolLM2-135M, {args.threads} threads, prompt {args.prompt} tokens, decode {args.decode} tokens (median of {args.repeat} rounds, engines in turn)")
print(f"(q4_1 / q8_0 / q4_k_m rows: llmos executes the file's blocks with f32 activations and a {QKV} KV cache,"
      " llama.cpp the same file, transformers its dequantized f32 weights; llama.cpp's KV cache is f16 in every row,"
      " llmos' f32 in the f32 row and bf16 in the bf16 row, transformers' the model's dtype)")
print(f"{'engine':<16}{'file':<8}{'prefill ms':>12}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}")
for r in rows:
    rss = f"{r['peak_rss_mb']:>13.0f}" if "peak_rss_mb" in r else f"{'':>13}"
    print(f"{r['engine']:<16}{r['dtype']:<8}{r['prefill_s'] * 1e3:>12.1f}{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.1f}{rss}")
print("\nratios (llmos / peer; >1 means llmos is faster)")
for dtype, _ in files:
    mine = next(r for r in rows if r["engine"] == "llmos" and r["dtype"] == dtype)
    for peer in ("transformers", "llama.cpp"):
        o = next(r for r in rows if r["engine"] == peer and r["dtype"] == dtype)
        print(f"  {dtype:<6} vs {peer:<13} decode {mine['decode_tokens_per_s'] / o['decode_tokens_per_s']:.2f}x"
              f"   prefill {o['prefill_s'] / mine['prefill_s']:.2f}x")
print(f"\nthread scaling, 1 -> {args.threads} threads (gain = ratio - 1; a plain memory read of 256 MB by `llmos-worker bench`,"
      f" median of the reads every llmos run of the file made)")
for dtype, _ in files:
    one = next(r for r in rows if r["engine"] == "llmos 1 thread" and r["dtype"] == dtype)
    many = next(r for r in rows if r["engine"] == "llmos" and r["dtype"] == dtype)
    reads = reads_by_file[dtype]
    r1, rn = statistics.median(reads["1"]), statistics.median(reads[str(args.threads)])
    dg = many["decode_tokens_per_s"] / one["decode_tokens_per_s"] - 1
    mg = rn / r1 - 1
    print(f"  {dtype:<6} decode {one['decode_tokens_per_s']:.1f} -> {many['decode_tokens_per_s']:.1f} tok/s (gain {dg * 100:+.0f}%);"
          f" memory read {r1:.1f} -> {rn:.1f} GB/s (gain {mg * 100:+.0f}%); decode gain / read gain {dg / mg if mg > 0 else float('nan'):.2f}")
    # Weights each decoded token reads, from any run (the same per file).
    last = last_llmos[(dtype, args.threads, None)]
    gb = last["decode_weight_gb_per_s"] / last["decode_tokens_per_s"]
    w1, wn = one["decode_tokens_per_s"] * gb, many["decode_tokens_per_s"] * gb
    print(f"        weights streamed by decode {w1:.1f} -> {wn:.1f} GB/s: {w1 / r1 * 100:.0f}% -> {wn / rn * 100:.0f}% of the read's")
k = last_llmos[("f32", args.threads, None)]["cpu_kernels"]
print(f"\nkernel bodies chosen by calibration: blocks {k['blocks']}, bf16 {k['bf16']}; rates GB/s {k['calibration_gb_per_s']}")
if args.baseline:
    print(f"\nagainst the baseline binary {args.baseline} (llmos / baseline; >1 means faster now)")
    for dtype in dict.fromkeys(r["dtype"] for r in rows if r["engine"] == "llmos-baseline"):
        mine = next(r for r in rows if r["engine"] == "llmos" and r["dtype"] == dtype)
        base = next(r for r in rows if r["engine"] == "llmos-baseline" and r["dtype"] == dtype)
        print(f"  {dtype:<6} decode {mine['decode_tokens_per_s'] / base['decode_tokens_per_s']:.3f}x"
              f"   prefill {base['prefill_s'] / mine['prefill_s']:.3f}x")
print(json.dumps(rows))
