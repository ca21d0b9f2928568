"""Training-step throughput: our models vs Hugging Face's GPT2LMHeadModel at the same
dimensions, measured in the same run. One JSON line per measurement on stdout:

  {"bench": "train_throughput", "model": "ours-transformer", "size": "small", "tokens_per_s": ...,
   "step_ms": ..., "mfu": ... (GPU only), "peak_mem_mb": ..., "params": ..., "ratio_vs_gpt2": ...}

Each measurement runs in its own subprocess so peak memory is its own. A step is a
full optimizer step: forward, cross-entropy, backward, AdamW, as the trainer does it
(bf16 autocast on CUDA, fp32 on CPU).

    python bench/train_throughput.py                      # CPU-sized defaults
    python bench/train_throughput.py --sizes tierA --steps 30
    python bench/train_throughput.py --preset configs/00_best_general.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # d_model, n_layers, n_heads, seq_length, batch, vocab
    "tiny": (128, 2, 4, 128, 8, 4096),
    "small": (256, 4, 4, 256, 8, 8192),
    "tierA": (512, 8, 8, 1024, 8, 50257),
    "tierB": (768, 12, 12, 1024, 8, 50257),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def build(kind: str, d: int, layers: int, heads: int, seq: int, vocab: int, arch: str):
    import torch

    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=layers, n_head=heads,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        model = GPT2LMHeadModel(cfg)

        def step_loss(x, y):
            logits = model(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        return model, step_loss
    from model import ModelConfig, build_model

    model = build_model(ModelConfig(arch=arch, d_model=d, n_layers=layers, n_heads=heads), vocab)
    state = {"s": None}

    def step_loss(x, y):
        out = model(x, state=state["s"])
        if model.carries_state:
            from model import detach_state

            state["s"] = detach_state(out.state)
        return torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())

    return model, step_loss


def measure(kind: str, arch: str, size: str, dims: tuple, steps: int, warmup: int) -> dict:
    """Runs in a child process: time `steps` optimizer steps after `warmup` ones."""
    import torch

    from model import count_params

    d, layers, heads, seq, batch, vocab = dims
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model, step_loss = build(kind, d, layers, heads, seq, vocab, arch)
    model.to(dev).train()
    n_params = count_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=dev.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    data = torch.randint(0, vocab, (steps + warmup, batch, seq + 1), device=dev)

    def one(i):
        with autocast:
            loss = step_loss(data[i, :, :-1], data[i, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        one(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        one(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * batch * seq / seconds
    row = {"bench": "train_throughput", "model": kind if kind == "gpt2" else f"ours-{arch}", "size": size,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "params": n_params,
           "d_model": d, "n_layers": layers, "seq_length": seq, "batch": batch, "vocab": vocab,
           "tokens_per_s": round(tokens_per_s, 1), "step_ms": round(1000 * seconds / steps, 2)}
    if dev.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peak = peak_flops(row["device"])
        flops_per_token = 6 * n_params + 6 * layers * d * seq  # matmuls fwd+bwd, plus causal attention
        row["mfu"] = round(flops_per_token * tokens_per_s / peak, 4) if peak else None
    else:
        row["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help=f"comma list of {','.join(SIZES)}")
    ap.add_argument("--preset", help="measure this preset's model dimensions instead of --sizes")
    ap.add_argument("--archs", default="transformer", help="our archs to measure: transformer,hatchling")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one measurement, in a fresh process
        print(json.dumps(measure(**json.loads(args.child))))
        return
    jobs = []
    if args.preset:
        from train.estimate import vocab_size_guess
        from train.preset import load_preset

        p, _ = load_preset(args.preset)
        m = p.model
        jobs.append((Path(args.preset).stem, (m.d_model, m.n_layers, m.n_heads, p.train.seq_length,
                                              p.train.batch_size, vocab_size_guess(p.tokenizer))))
    else:
        jobs = [(s, SIZES[s]) for s in args.sizes.split(",")]
    for size, dims in jobs:
        rows = {}
        for kind, arch in [("gpt2", "")] + [("ours", a) for a in args.archs.split(",")]:
            spec = {"kind": kind, "arch": arch or "transformer", "size": size, "dims": dims, "steps": args.steps,
                    "warmup": args.warmup}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                print(json.dumps({"bench": "train_throughput", "model": kind, "size": size,
                                  "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}))
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[row["model"]] = row
            if "gpt2" in rows and row["model"] != "gpt2":
                row["ratio_vs_gpt2"] = round(row["tokens_per_s"] / rows["gpt2"]["tokens_per_s"], 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
