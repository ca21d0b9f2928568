"""Our Triton kernels (model/ops/triton: LIF scan with modulation, gated RMSNorm, short
conv) against their PyTorch references, and training KDA: flash-linear-attention's
`chunk_kda` (impl "fla": called directly; "fla-glue": through our training path,
`ops.kda` with fla forced, with its layout changes and cu_seqlens) against our PyTorch
chunked form ("reference").

    python bench/kernels.py                 # T = 1k, 2k, 4k, 8k
    python bench/kernels.py --quick         # T = 1k, 2k, fewer repeats
    python bench/kernels.py --seq 4096 --batch 4 --heads 16 --head-dim 128

Prints one JSON line per measurement: op, impl (triton / reference / fla / fla-glue), pass
(fwd or fwd+bwd), shape, dtype, ms (median over --reps timed runs, CUDA events, after
warm-up), peak_mem_mb (max_memory_allocated during those runs), and for the fast runs
rel_err (the output's relative error against the reference, same inputs). Each fast
implementation is forced (model.ops.dispatch.forcing: no first-call check). On a machine
with no CUDA device it prints one line saying so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ops  # noqa: E402
from model.ops import (
    dispatch,  # noqa: E402
    triton as triton_ops,  # noqa: E402
)


def using(op: str, impl: str, fn):
    """fn(mode) run with `impl` for `op`: "reference" is mode="reference", the rest forced."""
    def run(*args):
        if impl == "reference":
            return fn(*args, mode="reference")
        with dispatch.forcing(op, impl):
            return fn(*args, mode="auto")
    return run


def emit(**rec):
    print(json.dumps(rec), flush=True)


def time_ms(fn, reps: int, warmup: int = 3):
    """Median ms of fn() with CUDA events, and the peak memory (MiB) over the timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 20


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fwd_bwd(run, inputs, grads_out):
    """fn running forward then backward (given output gradients) of run(*inputs)."""

    def fn():
        outs = run(*inputs)
        outs = [o for o in outs if o is not None]
        with dispatch.forcing("lif_modulate", "triton"), dispatch.forcing("gated_rmsnorm", "triton"), \
                dispatch.forcing("short_conv", "triton"):  # a backward runs the forward's implementation
            torch.autograd.grad(outs, inputs, grads_out[: len(outs)], allow_unused=True)

    return fn


def bench_kda(B, H, T, dk, dtype, reps, fla):
    dev = "cuda"
    q = F.normalize(torch.randn(B, H, T, dk, device=dev), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, H, T, dk, device=dev), dim=-1).to(dtype)
    v = torch.randn(B, H, T, dk, device=dev, dtype=dtype)
    g = (-F.softplus(torch.randn(B, H, T, dk, device=dev) - 2)).to(dtype)
    beta = torch.rand(B, H, T, device=dev, dtype=dtype)
    ins = [x.requires_grad_() for x in (q, k, v, g, beta)]
    do = torch.randn(B, H, T, dk, device=dev, dtype=dtype)
    shape = dict(B=B, H=H, T=T, dk=dk, dv=dk, dtype=str(dtype).replace("torch.", ""))
    impls = {"reference": lambda *x: ops.kda(*x, mode="reference", impl="chunk", chunk_size=64)}
    if fla is not None:  # fla: [B, T, H, d], log-space gates
        # our glue (model/ops/fla.py: layout, cu_seqlens, segment states) around chunk_kda
        impls["fla-glue"] = using("kda", "fla", lambda *x, mode: ops.kda(*x, mode=mode))
        impls["fla"] = lambda q, k, v, g, b: fla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  g.transpose(1, 2), b.transpose(1, 2), scale=dk ** -0.5)
    with torch.no_grad():
        o_ref = impls["reference"](*ins)[0]
    for name, run in impls.items():
        for mode in ("fwd", "fwd+bwd"):
            try:
                if mode == "fwd":
                    def fn(run=run):
                        with torch.no_grad():
                            run(*ins)
                else:
                    fn = fwd_bwd(lambda *x, run=run: run(*x)[:1], ins, [do if name != "fla" else do.transpose(1, 2)])
                ms, peak = time_ms(fn, reps)
            except Exception as e:  # e.g. out of memory for the reference at 8k, or fla/Triton mismatch
                emit(op="kda", impl=name, **{"pass": mode}, **shape, error=repr(e)[:300])
                torch.cuda.empty_cache()
                continue
            rec = dict(op="kda", impl=name, **{"pass": mode}, **shape, ms=round(ms, 3), peak_mem_mb=round(peak, 1),
                       tokens_per_s=round(B * T / ms * 1e3))
            if mode == "fwd" and name != "reference":
                with torch.no_grad():
                    o = run(*ins)[0]
                rec["rel_err"] = rel_err(o.transpose(1, 2) if name == "fla" else o, o_ref)
            emit(**rec)
            torch.cuda.empty_cache()


def bench_lif(B, T, H, N, reps):
    dev = "cuda"
    drive = (torch.randn(B, T, H, N, device=dev) * 0.6 + 0.3).requires_grad_()
    a = torch.rand(B, T, H, N, device=dev, requires_grad=True)
    bl = torch.randn(B, T, H, device=dev, requires_grad=True)
    ins = [drive, a, bl]
    gouts = [torch.randn(B, T, H, N, device=dev), None, torch.randn(B, T, H, N, device=dev),
             torch.randn(B, T, H, device=dev)]
    with torch.no_grad():
        ref = ops.lif_modulate(*ins, 0.9, 1.0, mode="reference")
    for name in ("triton", "reference"):
        def run(*x, name=name):
            s, m, la, b = using("lif_modulate", name, lambda *y, **kw: ops.lif_modulate(*y, 0.9, 1.0, **kw))(*x)
            return s, la, b
        g3 = [gouts[0], gouts[2], gouts[3]]
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                def fn(run=run):
                    with torch.no_grad():
                        run(*ins)
            else:
                fn = fwd_bwd(run, ins, g3)
            ms, peak = time_ms(fn, reps)
            rec = dict(op="lif_modulate", impl=name, **{"pass": mode}, B=B, T=T, H=H, N=N, ms=round(ms, 3),
                       peak_mem_mb=round(peak, 1))
            if name == "triton" and mode == "fwd":
                with torch.no_grad():
                    out = using("lif_modulate", "triton", lambda *y, **kw: ops.lif_modulate(*y, 0.9, 1.0, **kw))(
                        *ins)
                rec["spike_mismatch"] = (out[0] != ref[0]).float().mean().item()
                rec["rel_err_beta"] = rel_err(out[3], ref[3])
            emit(**rec)


def bench_rmsnorm(B, T, H, d, reps):
    dev = "cuda"
    o = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(d, device=dev, requires_grad=True)
    dy = torch.randn(B, T, H, d, device=dev)
    ref = ops.gated_rmsnorm(o, gate, w, 1e-6, mode="reference").detach()
    for name in ("triton", "reference"):
        norm = using("gated_rmsnorm", name, lambda *x, mode: ops.gated_rmsnorm(*x, 1e-6, mode=mode))
        run = lambda *x, norm=norm: (norm(*x),)  # noqa: E731
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                def fn(run=run):
                    with torch.no_grad():
                        run(o, gate, w)
            else:
                fn = fwd_bwd(run, [o, gate, w], [dy])
            ms, peak = time_ms(fn, reps)
            rec = dict(op="gated_rmsnorm", impl=name, **{"pass": mode}, B=B, T=T, H=H, d=d, dtype="bfloat16",
                       ms=round(ms, 3), peak_mem_mb=round(peak, 1))
            if name == "triton" and mode == "fwd":
                rec["rel_err"] = rel_err(norm(o, gate, w), ref)
            emit(**rec)


def bench_conv(B, T, D, K, reps):
    dev = "cuda"
    xx = torch.randn(B, T + K - 1, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(D, K, device=dev, requires_grad=True)
    dy = torch.randn(B, T, D, device=dev, dtype=torch.bfloat16)
    ref = ops.short_conv(xx, w, mode="reference").detach()
    for name in ("triton", "reference"):
        conv = using("short_conv", name, lambda *x, mode: ops.short_conv(*x, mode=mode))
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                def fn(conv=conv):
                    with torch.no_grad():
                        conv(xx, w)
            else:
                fn = fwd_bwd(lambda *x, conv=conv: (conv(*x),), [xx, w], [dy])
            ms, peak = time_ms(fn, reps)
            rec = dict(op="short_conv", impl=name, **{"pass": mode}, B=B, T=T, D=D, K=K, dtype="bfloat16",
                       ms=round(ms, 3), peak_mem_mb=round(peak, 1))
            if name == "triton" and mode == "fwd":
                rec["rel_err"] = rel_err(conv(xx, w), ref)
            emit(**rec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 1k, 2k and fewer repeats")
    ap.add_argument("--seq", type=int, nargs="*", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--ops", nargs="*", default=["kda", "lif", "rmsnorm", "conv"])
    args = ap.parse_args()

    if not torch.cuda.is_available():
        emit(bench="kernels", skipped="no CUDA device: nothing to time (the Triton kernels need one)")
        return 0
    if triton_ops.unavailable():
        emit(bench="kernels", skipped=triton_ops.unavailable())
        return 0
    seqs = args.seq or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192])
    reps = args.reps or (5 if args.quick else 20)
    B, H, dk = args.batch, args.heads, args.head_dim
    torch.manual_seed(0)
    import triton

    emit(bench="kernels", device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
         triton=triton.__version__)

    fla = None
    if "kda" in args.ops:
        try:
            from fla.ops.kda import chunk_kda as fla
        except Exception as e:  # not installed, or no matching Triton
            emit(op="kda", impl="fla", skipped=repr(e)[:200])

    for T in seqs:
        if "kda" in args.ops:
            for dtype in (torch.bfloat16, torch.float32):
                bench_kda(B, H, T, dk, dtype, reps, fla)
        if "lif" in args.ops:
            bench_lif(B, T, H, dk, reps)
        if "rmsnorm" in args.ops:
            bench_rmsnorm(B, T, H, dk, reps)
        if "conv" in args.ops:
            bench_conv(B, T, 3 * H * dk, 4, reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
