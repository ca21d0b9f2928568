"""Forward + backward cost of one Spike-KDA layer (chunked and sequential forms) against
a softmax attention layer of the same width, over sequence lengths.

    python bench/kda_layer.py            # seq 256 .. 4096
    python bench/kda_layer.py --quick    # seq 256 .. 1024, fewer repeats

Prints one JSON line per measurement: impl, device, batch, seq_len, d_model, n_heads,
ms (median forward+backward), tokens_per_s, peak_mem_mb (CUDA max_memory_allocated;
null on CPU, where there is no reliable per-call peak), repeats. On CUDA it also times
flash-linear-attention's `fla.ops.kda.chunk_kda` kernel when it is importable, next to
our pure-PyTorch `kda_chunk` op with the same shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.config import ModelConfig  # noqa: E402
from model.ops.reference.kda import kda_chunk  # noqa: E402
from model.spike_kda import SpikeKDA  # noqa: E402
from model.transformer import CausalSelfAttention  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats: int, slow_s: float):
    """Median ms of fn() (forward + backward) and the peak CUDA memory in MiB (or None)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    fn()  # warm-up (allocator, kernels); if it is already slow, it is the measurement
    sync(device)
    first = time.perf_counter() - t0
    times = [first]
    if first < slow_s:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return statistics.median(times) * 1e3, peak, len(times)


def layer_step(layer, x):
    def fn():
        out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        y.float().square().mean().backward()
    return fn


def op_step(op, B, H, T, dk, device):
    q = torch.nn.functional.normalize(torch.randn(B, H, T, dk, device=device), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, H, T, dk, device=device), dim=-1).requires_grad_()
    v = torch.randn(B, H, T, dk, device=device, requires_grad=True)
    g = (-torch.rand(B, H, T, dk, device=device) * 0.1).requires_grad_()
    beta = torch.rand(B, H, T, device=device, requires_grad=True)

    def fn():
        o = op(q, k, v, g, beta)
        o.float().square().mean().backward()
    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seq lengths up to 1024, fewer repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, nargs="*", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    seqs = args.seq or ([256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096])
    repeats = 2 if args.quick else 5
    slow_s = 2.0 if args.quick else 10.0  # a warm-up slower than this is reported alone
    B, d, H = args.batch, args.d_model, args.heads
    torch.manual_seed(0)

    layers = {}
    for impl in ("chunk", "recurrent"):
        cfg = ModelConfig(arch="hatchling", d_model=d, n_heads=H, kda_impl=impl)
        layers[f"spike_kda_{impl}"] = SpikeKDA(cfg).to(device)
    layers["softmax_attention"] = CausalSelfAttention(ModelConfig(d_model=d, n_heads=H)).to(device)

    ops = {"op_kda_chunk": lambda q, k, v, g, b: kda_chunk(q, k, v, g, b, chunk_size=64)[0]}
    if device.type == "cuda":
        try:
            from fla.ops.kda import chunk_kda

            # fla takes [B, T, H, d] and log-space gates g
            ops["op_fla_chunk_kda"] = lambda q, k, v, g, b: chunk_kda(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2), b.transpose(1, 2))[0]
        except Exception as e:  # not installed, or no matching Triton
            print(json.dumps({"impl": "op_fla_chunk_kda", "device": str(device), "skipped": repr(e)[:200]}))

    for T in seqs:
        x = torch.randn(B, T, d, device=device, requires_grad=True)
        for name, layer in layers.items():
            ms, peak, n = measure(layer_step(layer, x), device, repeats, slow_s)
            print(json.dumps({"impl": name, "device": str(device), "batch": B, "seq_len": T, "d_model": d,
                              "n_heads": H, "ms": round(ms, 2), "tokens_per_s": round(B * T / ms * 1e3),
                              "peak_mem_mb": None if peak is None else round(peak, 1), "repeats": n}), flush=True)
        for name, op in ops.items():
            try:
                ms, peak, n = measure(op_step(op, B, H, T, d // H, device), device, repeats, slow_s)
            except Exception as e:
                print(json.dumps({"impl": name, "device": str(device), "seq_len": T, "error": repr(e)[:200]}))
                continue
            print(json.dumps({"impl": name, "device": str(device), "batch": B, "seq_len": T, "d_model": d,
                              "n_heads": H, "ms": round(ms, 2), "tokens_per_s": round(B * T / ms * 1e3),
                              "peak_mem_mb": None if peak is None else round(peak, 1), "repeats": n}), flush=True)


if __name__ == "__main__":
    main()
