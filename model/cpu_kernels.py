"""Small compiled loops for CPU tensors, where PyTorch would take many passes or a Python
loop, each with its backward: the LIF membrane recurrence with Spike-KDA's modulation
folded in (csrc_cpu/lif_scan.c); ShortConv's causal depthwise convolution
(csrc_cpu/short_conv.c); Spike-KDA's split of q/k/v into head-major tensors with q and k
L2-normalised (csrc_cpu/split_heads.c); its gated RMSNorm (csrc_cpu/gated_norm.c); the
chunked KDA itself (csrc_cpu/kda_chunk.c, whose autograd Function is model/kda_cpu.py).

Built once per process with the system C compiler (model/native.py caches the library by
source hash) and called through ctypes, which releases the GIL. Each call uses
`torch.get_num_threads()` threads: built with OpenMP (csrc_cpu/parallel.h), the library
joins torch's own OpenMP runtime and shares its loop among torch's thread team; where the
compiler has no OpenMP, the batch rows are split among a Python thread pool instead.
`available()` is False where no compiler exists or `SPIKE_NATIVE=0`; then one log line
says so and callers run their PyTorch path. The PyTorch paths are the specification;
tests compare the two.
"""
from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from . import native

CSRC = Path(__file__).resolve().parent / "csrc_cpu"
_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_SIGNATURES = {  # every function ends with `threads` (see csrc_cpu/parallel.h)
    "lif_modulate_forward": [_P] * 9 + [_I] * 4 + [_D] * 2 + [_I],
    "lif_modulate_backward": [_P] * 12 + [_I] * 4 + [_D] * 3 + [_I],
    "short_conv_forward": [_P] * 3 + [_I] * 5 + [_I],
    "short_conv_backward": [_P] * 5 + [_I] * 5 + [_I],
    "split_heads_forward": [_P] * 5 + [_I] * 4 + [_D] + [_I],
    "split_heads_backward": [_P] * 7 + [_I] * 4 + [_D] + [_I],
    "gated_norm_forward": [_P] + [_I] * 3 + [_P] * 4 + [_I] * 4 + [_D, _I],
    "gated_norm_backward": [_P] + [_I] * 3 + [_P] * 7 + [_I] * 4 + [_I],
    "kda_chunk_forward": [_P] * 11 + [_I] * 6,
    "kda_chunk_backward": [_P] * 16 + [_I] * 6,
}
# -ffp-contract=off: the LIF's membrane arithmetic rounds as the PyTorch reference does, so
# spikes are identical; the KDA and norm loops may fuse multiply-adds (FMA on CPUs that have
# it), and -fno-trapping-math lets their clamps (vec_math.h) vectorise
_FLAGS = {"lif_scan": ["-O3", "-ffp-contract=off"], "short_conv": ["-O3", "-ffp-contract=off"],
          "split_heads": ["-O3", "-ffp-contract=off"], "kda_chunk": ["-O3", "-fno-trapping-math", "-fno-math-errno"],
          "gated_norm": ["-O3", "-fno-trapping-math", "-fno-math-errno"]}
_DEPENDS = {"kda_chunk": ["kda_chunk_body.h", "vec_math.h"], "gated_norm": ["vec_math.h"]}
_libs: dict[str, ctypes.CDLL] = {}
_state = {"tried": False, "ok": False, "openmp": False}
_pool: Optional[ThreadPoolExecutor] = None


def _announce() -> None:
    """One line, the first time this process compiles a loop (the cache was empty or stale)."""
    if not _state.get("announced"):
        _state["announced"] = True
        logging.getLogger("model.cpu_kernels").warning(
            "model.cpu_kernels: compiling the CPU loops (model/csrc_cpu) once for this machine, about half a minute")


def _build(name: str) -> tuple[ctypes.CDLL, bool]:
    """csrc_cpu/<name>.c built with OpenMP where the compiler has it, else without; returns
    (library, whether it threads its loops itself)."""
    compilers = [os.environ.get("CC"), "cc", "gcc", "clang"]
    source = CSRC / f"{name}.c"
    depends = [CSRC / "parallel.h", *(CSRC / h for h in _DEPENDS.get(name, ()))]
    try:
        lib = native.shared_library(source, compilers, _FLAGS[name] + ["-fopenmp"], depends=depends, on_build=_announce)
    except native.NativeUnavailable:  # e.g. clang without libomp: threads from Python instead
        lib = native.shared_library(source, compilers, _FLAGS[name], depends=depends, on_build=_announce)
    lib.cpu_kernels_openmp.restype, lib.cpu_kernels_openmp.argtypes = _I, []
    if name == "gated_norm":
        lib.gated_norm_max_dim.restype, lib.gated_norm_max_dim.argtypes = _I, []
    if name == "kda_chunk":
        lib.kda_chunk_work_size.restype, lib.kda_chunk_work_size.argtypes = _I, [_I] * 3
        lib.kda_chunk_max_dim.restype, lib.kda_chunk_max_dim.argtypes = _I, []
        lib.kda_chunk_allow_avx2.restype, lib.kda_chunk_allow_avx2.argtypes = None, [_I]
    return lib, bool(lib.cpu_kernels_openmp())


def row_pointer(element_size: int) -> Callable:
    """at(t, row, per): the address of row `row` of t (rows of `per` elements), None for None."""
    return lambda t, row, per: None if t is None else t.data_ptr() + row * per * element_size


def threads_for(rows: int) -> int:
    """How many parts run_rows(rows, ...) may run at once (per-part scratch is sized by it)."""
    return max(1, torch.get_num_threads() if _state["openmp"] else min(torch.get_num_threads(), rows))


@torch.compiler.disable
def available() -> bool:
    """Whether the compiled loops serve CPU tensors in this process (built on first call).
    Every entry point here is kept out of torch.compile's graphs (a ctypes call cannot be
    traced): a graph break, not a warning."""
    if not _state["tried"]:
        _state["tried"] = True
        if os.environ.get("SPIKE_NATIVE", "1").strip() == "0":
            return False
        try:
            openmp = []
            for name in _FLAGS:
                lib, threaded = _build(name)
                openmp.append(threaded)
                for fn_name, argtypes in _SIGNATURES.items():
                    for suffix in ("f32", "f64"):
                        fn = getattr(lib, f"{fn_name}_{suffix}", None)
                        if fn is not None:
                            fn.restype, fn.argtypes = None, argtypes
                _libs[name] = lib
        except native.NativeUnavailable as exc:
            logging.getLogger("model.cpu_kernels").warning(
                "model.cpu_kernels: compiled CPU loops unavailable, running the PyTorch paths (%s)",
                str(exc).splitlines()[0])
            return False
        _state["ok"], _state["openmp"] = True, all(openmp)
    return _state["ok"]


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops take these tensors: CPU, float32 or float64, and built."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors) and available()


def library(name: str) -> ctypes.CDLL:
    """The loaded csrc_cpu/<name>.c (its int64 helpers, e.g. kda_chunk_work_size, typed)."""
    if not available():
        raise RuntimeError("model.cpu_kernels: the compiled CPU loops are unavailable (see the log)")
    return _libs[name]


def compiled(lib: str, name: str, dtype: torch.dtype) -> Callable:
    """The ctypes function `name` of csrc_cpu/<lib>.c for `dtype` (float32 or float64)."""
    return getattr(library(lib), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def run_rows(rows: int, work: Callable[[int, int, int, int], None]) -> None:
    """work(part, b0, b1, threads) over `rows` rows (batch rows, or stream-heads). With
    OpenMP, one call over all rows with torch's thread count (the library shares the loop
    itself); else up to that many parts of one thread each, the first on the calling
    thread (which would otherwise only wait), the others on the pool."""
    global _pool
    if _state["openmp"]:
        work(0, 0, rows, torch.get_num_threads())
        return
    parts = threads_for(rows)
    if parts == 1:
        work(0, 0, rows, 1)
        return
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="cpu_kernels")
    bounds = [rows * i // parts for i in range(parts + 1)]
    rest = [_pool.submit(work, i, bounds[i], bounds[i + 1], 1) for i in range(1, parts)]
    work(0, bounds[0], bounds[1], 1)
    for f in rest:
        f.result()


@torch.compiler.disable
def lif_modulate(drive, a, beta_logit, decay: float, threshold: float, membrane=None, reset=None, slope: float = 5.0):
    """model/kernels/reference.py's lif_modulate_reference as one compiled pass each way:
    drive, a [B, T, H, D]; beta_logit [B, T, H]; membrane [B, H, D] or None; reset [B, T]
    or None -> (spikes, final membrane, log_alpha, beta [B, T, H]). a = None: no alpha
    modulation (log_alpha None, neither it nor a gradient for a computed)."""
    B, T, H, D = drive.shape
    m = drive.new_zeros(B, H, D) if membrane is None else membrane.to(drive.dtype)
    keep = None if reset is None else (~reset.bool()).to(drive.dtype)
    return LIFModulateFn.apply(drive, None if a is None else a.to(drive.dtype), beta_logit.to(drive.dtype), m, keep,
                               float(decay), float(threshold), float(slope))


class LIFModulateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, drive, a, beta_logit, membrane, keep, decay, threshold, slope):
        x, bl = drive.contiguous(), beta_logit.contiguous()
        a = None if a is None else a.contiguous()
        B, T, H, D = x.shape
        N, size = H * D, x.element_size()
        v_all, spikes = torch.empty_like(x), torch.empty_like(x)
        log_alpha = None if a is None else torch.empty_like(x)
        beta = torch.empty(B, T, H, dtype=x.dtype)
        m = torch.empty(B, H, D, dtype=x.dtype).copy_(membrane)
        k = None if keep is None else keep.contiguous()
        fn = compiled("lif_scan", "lif_modulate_forward", x.dtype)
        at = row_pointer(size)
        run_rows(B, lambda _, b0, b1, th: fn(at(x, b0, T * N), at(a, b0, T * N), at(bl, b0, T * H), at(k, b0, T),
                                           at(v_all, b0, T * N), at(spikes, b0, T * N), at(log_alpha, b0, T * N),
                                           at(beta, b0, T * H), at(m, b0, N), b1 - b0, T, H, D, decay, threshold, th))
        ctx.save_for_backward(v_all, a, bl, k)
        ctx.decay, ctx.threshold, ctx.slope = decay, threshold, slope
        return spikes, m, log_alpha, beta

    @staticmethod
    def backward(ctx, g_spikes, g_m, g_log_alpha, g_beta):
        v_all, a, bl, k = ctx.saved_tensors
        B, T, H, D = v_all.shape
        N, size = H * D, v_all.element_size()
        g_spikes, g_m, g_log_alpha, g_beta = (None if g is None else g.to(v_all.dtype).contiguous()
                                              for g in (g_spikes, g_m, g_log_alpha, g_beta))
        if a is None:
            g_log_alpha = None
        grad_drive, grad_a = torch.empty_like(v_all), None if a is None else torch.empty_like(v_all)
        grad_bl, grad_m0 = torch.empty(B, T, H, dtype=v_all.dtype), torch.empty(B, H, D, dtype=v_all.dtype)
        fn = compiled("lif_scan", "lif_modulate_backward", v_all.dtype)
        at = row_pointer(size)
        run_rows(B, lambda _, b0, b1, th: fn(at(v_all, b0, T * N), at(a, b0, T * N), at(bl, b0, T * H), at(k, b0, T),
                                           at(g_spikes, b0, T * N), at(g_m, b0, N), at(g_log_alpha, b0, T * N),
                                           at(g_beta, b0, T * H), at(grad_drive, b0, T * N), at(grad_a, b0, T * N),
                                           at(grad_bl, b0, T * H), at(grad_m0, b0, N), b1 - b0, T, H, D, ctx.decay,
                                           ctx.threshold, ctx.slope, th))
        return grad_drive, grad_a, grad_bl, grad_m0, None, None, None, None


@torch.compiler.disable
def short_conv(xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ShortConvFn.apply, kept out of torch.compile's graphs."""
    return ShortConvFn.apply(xx, weight)


class ShortConvFn(torch.autograd.Function):
    """y [B, T, D] = causal depthwise conv of xx [B, T+K-1, D] with weight [D, K]:
    y[:, t] = sum_j weight[:, j] * xx[:, t + j]."""

    @staticmethod
    def forward(ctx, xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xx = xx.contiguous()
        B, TK, D = xx.shape
        K = weight.shape[1]
        T = TK - K + 1
        w = weight.to(xx.dtype).t().contiguous()  # [K, D]
        y = torch.empty(B, T, D, dtype=xx.dtype)
        fn, size = compiled("short_conv", "short_conv_forward", xx.dtype), xx.element_size()
        run_rows(B, lambda _, b0, b1, th: fn(xx.data_ptr() + b0 * TK * D * size, w.data_ptr(),
                                           y.data_ptr() + b0 * T * D * size, 0, b1 - b0, T, D, K, th))
        ctx.save_for_backward(xx, w)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xx, w = ctx.saved_tensors
        gy = gy.contiguous()
        B, TK, D = xx.shape
        K = w.shape[0]
        T = TK - K + 1
        gxx = torch.empty_like(xx)
        gw = torch.empty(B, K, D, dtype=xx.dtype)  # each row's share, summed in a fixed order below
        fn, size = compiled("short_conv", "short_conv_backward", xx.dtype), xx.element_size()
        run_rows(B, lambda _, b0, b1, th: fn(xx.data_ptr() + b0 * TK * D * size, w.data_ptr(),
                                           gy.data_ptr() + b0 * T * D * size, gxx.data_ptr() + b0 * TK * D * size,
                                           gw.data_ptr() + b0 * K * D * size, 0, b1 - b0, T, D, K, th))
        return gxx, gw.sum(0).t().to(ctx.weight_dtype)


NORM_EPS = 1e-12  # F.normalize's default


@torch.compiler.disable
def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, 3 * H * D] -> q, k, v [B, H, T, D] contiguous, q and k L2-normalised over D:
    `F.normalize(x, dim=-1)` of qkv.view(B, T, 3, H, D).unbind(2), transposed to head-major."""
    return SplitHeadsFn.apply(qkv, heads)


class SplitHeadsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int):
        x = qkv.contiguous()
        B, T, F3 = x.shape
        H, D = heads, F3 // (3 * heads)
        q, k, v = (torch.empty(B, H, T, D, dtype=x.dtype) for _ in range(3))
        inv = torch.empty(B, 2, H, T, dtype=x.dtype)
        fn, size = compiled("split_heads", "split_heads_forward", x.dtype), x.element_size()
        run_rows(B, lambda _, b0, b1, th: fn(x.data_ptr() + b0 * T * F3 * size,
                                           *(t.data_ptr() + b0 * H * T * D * size for t in (q, k, v)),
                                           inv.data_ptr() + b0 * 2 * H * T * size, b1 - b0, T, H, D, NORM_EPS, th))
        ctx.save_for_backward(q, k, inv)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        q, k, inv = ctx.saved_tensors
        B, H, T, D = q.shape
        grads = [None if g is None else g.to(q.dtype).contiguous() for g in (dq, dk, dv)]
        dqkv = torch.empty(B, T, 3 * H * D, dtype=q.dtype)
        fn, size = compiled("split_heads", "split_heads_backward", q.dtype), q.element_size()
        at = lambda t, b0: None if t is None else t.data_ptr() + b0 * H * T * D * size  # noqa: E731
        run_rows(B, lambda _, b0, b1, th: fn(at(q, b0), at(k, b0), inv.data_ptr() + b0 * 2 * H * T * size,
                                           *(at(g, b0) for g in grads), dqkv.data_ptr() + b0 * T * 3 * H * D * size,
                                           b1 - b0, T, H, D, NORM_EPS, th))
        return dqkv, None


@torch.compiler.disable
def gated_rmsnorm(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """gated_rmsnorm_reference (RMSNorm(o) * weight * silu(gate) over the last dim) in one
    compiled pass each way. o, gate [B, T, H, D] (o may be a view with any strides but a
    unit last one, e.g. the KDA's [B, H, T, D] output transposed); weight [D]. Returns y
    [B, T, H, D] contiguous, in o's dtype (float32 or float64)."""
    return GatedNormFn.apply(o, gate, weight, float(eps))


@torch.compiler.disable
def gated_rmsnorm_serves(o: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether gated_rmsnorm takes these: float32 CPU tensors (the reference computes in
    float32), four dims, o's last dim unit-strided, D within the loop's row buffers."""
    return (o.dtype == gate.dtype == torch.float32 and o.dim() == 4 and o.stride(-1) == 1 and serves(o, gate)
            and o.shape[-1] <= library("gated_norm").gated_norm_max_dim())


class GatedNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, gate, weight, eps):
        if o.stride(-1) != 1:
            o = o.contiguous()
        gate, w = gate.contiguous(), weight.to(o.dtype).contiguous()
        B, T, H, D = o.shape
        sb, st, sh, _ = o.stride()
        y, rstd = torch.empty(B, T, H, D, dtype=o.dtype), torch.empty(B, T, H, dtype=o.dtype)
        fn, es = compiled("gated_norm", "gated_norm_forward", o.dtype), o.element_size()
        run_rows(B, lambda _, b0, b1, th: fn(o.data_ptr() + b0 * sb * es, sb, st, sh,
                                             gate.data_ptr() + b0 * T * H * D * es, w.data_ptr(),
                                             y.data_ptr() + b0 * T * H * D * es, rstd.data_ptr() + b0 * T * H * es,
                                             b1 - b0, T, H, D, eps, th))
        ctx.save_for_backward(o, gate, w, rstd)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        o, gate, w, rstd = ctx.saved_tensors
        gy = gy.to(o.dtype).contiguous()
        B, T, H, D = o.shape
        sb, st, sh, _ = o.stride()
        go = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype)  # o's layout: its transpose stays contiguous
        ggate, gw = torch.empty_like(gate), torch.empty(B * T, D, dtype=o.dtype)
        fn, es = compiled("gated_norm", "gated_norm_backward", o.dtype), o.element_size()
        run_rows(B, lambda _, b0, b1, th: fn(o.data_ptr() + b0 * sb * es, sb, st, sh,
                                             gate.data_ptr() + b0 * T * H * D * es, w.data_ptr(),
                                             rstd.data_ptr() + b0 * T * H * es, gy.data_ptr() + b0 * T * H * D * es,
                                             go.data_ptr() + b0 * sb * es, ggate.data_ptr() + b0 * T * H * D * es,
                                             gw.data_ptr() + b0 * T * D * es, b1 - b0, T, H, D, th))
        return go, ggate, gw.sum(0).to(ctx.weight_dtype), None
