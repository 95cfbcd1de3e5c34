"""Hugging Face transformers static batching of a serving workload: requests
in arrival order, in batches of --batch, left-padded, each batch generating
greedily to its longest requested output (EOS ignored). Throughput counts
the tokens the requests asked for, over the whole run's wall time.

Usage: serving_hf.py GGUF WORKLOAD_JSON [--batch 8] [--threads 2]
"""

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("gguf")
p.add_argument("workload")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)

w = json.load(open(args.workload))
prompts, outputs = w["prompts"], w["outputs"]
d, f = os.path.split(args.gguf)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
pad = 0


def run(indices):
    batch = [prompts[i] for i in indices]
    n = max(outputs[i] for i in indices)
    width = max(len(x) for x in batch)
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
        )


run([0])  # warm-up
start = time.perf_counter()
for b in range(0, len(prompts), args.batch):
    run(list(range(b, min(b + args.batch, len(prompts)))))
wall = time.perf_counter() - start
print(f"requests {len(prompts)} batch {args.batch} wall_s {wall:.2f}")
print(f"tokens_per_s {sum(outputs) / wall:.2f}")
