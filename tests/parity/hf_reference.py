"""Reference outputs from Hugging Face transformers for llmos parity tests.

Usage:
  hf_reference.py gguf OUT_DIR GGUF_PATH     SmolLM2 (or any Llama GGUF) read by transformers
  hf_reference.py tiny OUT_DIR KIND          writes a seeded tiny random model to OUT_DIR/model
                                             (KIND: llama = GQA + untied + llama3 rope scaling,
                                             qwen2 = q/k/v bias + tied) and its outputs

Writes OUT_DIR/manifest.json and, per prompt, little-endian float32 files of
the logits [tokens, vocab] of every prompt position and of the logits
[64, vocab] each greedy token was chosen from, computed in float32 with
transformers' own forward pass and a greedy loop over its KV cache.
"""

import json
import os
import sys

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("LLMOS_REF_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

GREEDY_TOKENS = 64
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Then it",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Les montagnes sont belles en hiver, et la neige",
    "Question: Why is the sky blue?\nAnswer:",
]
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@torch.no_grad()
def run(model, prompt_ids, out_dir):
    entries = []
    for i, ids in enumerate(prompt_ids):
        x = torch.tensor([ids])
        out = model(x, use_cache=True)
        logits = out.logits[0].float().numpy()
        path = os.path.join(out_dir, f"logits{i}.f32")
        logits.astype("<f4").tofile(path)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        greedy = [nxt]
        # The logits each greedy token was chosen from: the prompt's last
        # position, then each decode step's.
        chosen_from = [out.logits[0, -1].float().numpy()]
        for _ in range(GREEDY_TOKENS - 1):
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            greedy.append(nxt)
            chosen_from.append(out.logits[0, -1].float().numpy())
        greedy_path = os.path.join(out_dir, f"greedy_logits{i}.f32")
        np.stack(chosen_from).astype("<f4").tofile(greedy_path)
        entries.append(
            {"ids": ids, "logits_file": path, "logits_shape": list(logits.shape), "greedy": greedy,
             "greedy_logits_file": greedy_path}
        )
    return entries


def gguf(out_dir, gguf_path):
    d, f = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    entries = run(model, ids, out_dir)
    for e, p in zip(entries, PROMPTS):
        e["text"] = p
    tok_dir = os.path.join(out_dir, "tokenizer")
    tok.save_pretrained(tok_dir)
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return {
        "prompts": entries,
        "tokenizer_dir": tok_dir,
        "chat": {"messages": CHAT, "rendered": rendered},
    }


def tiny(out_dir, kind):
    torch.manual_seed(1234)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.2,
            rope_theta=1000000.0,
        )
        model = Qwen2ForCausalLM(cfg)
        # Random (not zero) biases so the bias path is exercised.
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.data.normal_(0, 0.2)
    else:
        raise SystemExit(f"unknown tiny kind {kind!r}")
    model = model.float().eval()
    model_dir = os.path.join(out_dir, "model")
    # Small shards so the index.json path is exercised.
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="200KB")
    g = torch.Generator().manual_seed(99)
    ids = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 7, 16, 33, 50)]
    return {"prompts": run(model, ids, out_dir), "model_dir": model_dir}


def main():
    mode, out_dir, arg = sys.argv[1:4]
    os.makedirs(out_dir, exist_ok=True)
    manifest = gguf(out_dir, arg) if mode == "gguf" else tiny(out_dir, arg)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
