"""The fast ops as `torch.library` custom ops (namespace `spike_ops`), so `torch.compile`
traces through them (a fake implementation each) instead of breaking its graph.

Each op is a kernel form (model/ops/reference/forms.py states them in PyTorch): a forward
op (`lif_fwd`, `conv_fwd`, `split_fwd`, `norm_fwd`, `kda_fwd`) with autograd registered,
whose backward is another op (`*_bwd`). `kda_fwd` takes the chunked KDA's inputs before
the data-dependent part of their preparation (the chunk choice, padding, segments), which
it does itself at run time. Their kernel is the same on every device: it asks
`provider` (model/ops/dispatch.py's `kernel`, set when that module loads) for the
implementation of the op for these tensors - the compiled C loop on CPU, the Triton kernel
on CUDA, the PyTorch form where neither serves or the first-call check turned the fast
one off - and runs it. Every forward op checks its arguments at the boundary and raises
a ValueError naming the one that is wrong, before any pointer reaches a kernel.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
from torch import Tensor

from .reference.kda import chunk_form, chunk_inputs, chunk_sizes

provider: Optional[Callable] = None  # (op, device, dtype, head) -> module of kernel forms


class _Defined:
    """An op another copy of this package already defined in this process (an exported
    model's own `model` package imported beside the repository's): its callers use that
    one, and nothing is registered twice (a second registration would replace the first
    copy's kernels, fake functions and autograd with this copy's)."""

    def __init__(self, op):
        self.op = op

    def __call__(self, *args):
        return self.op(*args)

    def register_fake(self, fn):
        return fn

    def register_autograd(self, *args, **kwargs) -> None:
        pass


def _define(name: str):
    """torch.library.custom_op(name), or the op of that name another copy already defined."""
    from torch._library.custom_ops import OPDEFS

    def wrap(fn):
        if name in OPDEFS:
            return _Defined(OPDEFS[name])
        return torch.library.custom_op(name, mutates_args=())(fn)
    return wrap


def _impl(op: str, x: Tensor, head: int):
    if provider is None:
        raise RuntimeError("model.ops.library: no kernel provider (import model.ops, not the library alone)")
    return provider(op, x.device, x.dtype, head)


def _fail(op: str, what: str):
    raise ValueError(f"model.ops.{op}: {what}")


def _want(op: str, name: str, t: Optional[Tensor], shape, like: Tensor, dtype: Optional[torch.dtype] = None):
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.device != like.device:
        _fail(op, f"{name} is on {t.device}, expected {like.device} (all inputs on one device)")
    if dtype is not None and t.dtype != dtype:
        _fail(op, f"{name} has dtype {t.dtype}, expected {dtype}")


def _float(op: str, name: str, t: Tensor):
    if not t.is_floating_point():
        _fail(op, f"{name} has dtype {t.dtype}, expected a floating dtype")


def _c(*ts: Tensor):
    """Outputs in the layout the fake implementations promise: contiguous."""
    return tuple(t.contiguous() for t in ts)


# ------------------------------------------------------------------ LIF scan with its modulation


@_define("spike_ops::lif_fwd")
def lif_fwd(drive: Tensor, a: Optional[Tensor], beta_logit: Tensor, membrane: Tensor, keep: Optional[Tensor],
            decay: float, threshold: float, slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """drive, a [B, T, H, D]; beta_logit [B, T, H]; membrane [B, H, D]; keep [B, T] or None ->
    (spikes, final membrane, log_alpha (empty when a is None), beta, v_all), drive's dtype."""
    if drive.dim() != 4 or drive.shape[1] == 0:
        _fail("lif_modulate", f"drive has shape {list(drive.shape)}, expected [B, T > 0, H, D]")
    _float("lif_modulate", "drive", drive)
    B, T, H, D = drive.shape
    _want("lif_modulate", "a", a, drive.shape, drive, drive.dtype)
    _want("lif_modulate", "beta_logit", beta_logit, (B, T, H), drive, drive.dtype)
    _want("lif_modulate", "membrane", membrane, (B, H, D), drive, drive.dtype)
    _want("lif_modulate", "keep", keep, (B, T), drive, drive.dtype)
    spikes, m, log_alpha, beta, v_all = _impl("lif_modulate", drive, D).lif_fwd(
        drive, a, beta_logit, membrane, keep, decay, threshold)
    return _c(spikes, m, drive.new_empty(0) if log_alpha is None else log_alpha, beta, v_all)


@lif_fwd.register_fake
def _(drive, a, beta_logit, membrane, keep, decay, threshold, slope):
    B, T, H, D = drive.shape
    x = torch.empty_like(drive, memory_format=torch.contiguous_format)
    return (x, drive.new_empty(B, H, D), drive.new_empty(0) if a is None else torch.empty_like(x),
            drive.new_empty(B, T, H), torch.empty_like(x))


@_define("spike_ops::lif_bwd")
def lif_bwd(v_all: Tensor, a: Optional[Tensor], beta_logit: Tensor, keep: Optional[Tensor], g_spikes: Tensor,
            g_m: Tensor, g_log_alpha: Optional[Tensor], g_beta: Tensor, decay: float, threshold: float,
            slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gd, ga, gbl, gm0 = _impl("lif_modulate", v_all, v_all.shape[-1]).lif_bwd(
        v_all, a, beta_logit, keep, g_spikes, g_m, g_log_alpha, g_beta, decay, threshold, slope)
    return _c(gd, v_all.new_empty(0) if ga is None else ga, gbl, gm0)


@lif_bwd.register_fake
def _(v_all, a, beta_logit, keep, g_spikes, g_m, g_log_alpha, g_beta, decay, threshold, slope):
    B, T, H, D = v_all.shape
    return (torch.empty_like(v_all), v_all.new_empty(0) if a is None else torch.empty_like(v_all),
            v_all.new_empty(B, T, H), v_all.new_empty(B, H, D))


def _lif_setup(ctx, inputs, output):
    drive, a, beta_logit, membrane, keep, decay, threshold, slope = inputs
    ctx.save_for_backward(output[4], a, beta_logit, keep)
    ctx.consts = (decay, threshold, slope)


def _lif_backward(ctx, g_spikes, g_m, g_log_alpha, g_beta, _g_v):
    v_all, a, beta_logit, keep = ctx.saved_tensors
    gd, ga, gbl, gm0 = lif_bwd(v_all, a, beta_logit, keep, g_spikes, g_m, None if a is None else g_log_alpha,
                               g_beta, *ctx.consts)
    return gd, None if a is None else ga, gbl, gm0, None, None, None, None


lif_fwd.register_autograd(_lif_backward, setup_context=_lif_setup)


# ------------------------------------------------------------------ short causal depthwise convolution


@_define("spike_ops::conv_fwd")
def conv_fwd(xx: Tensor, weight: Tensor) -> Tensor:
    """xx [B, T+K-1, D] (tail prepended), weight [D, K] -> y [B, T, D] in xx's dtype."""
    if xx.dim() != 3 or weight.dim() != 2 or weight.shape[0] != xx.shape[-1] or xx.shape[1] < weight.shape[1]:
        _fail("short_conv", f"xx {list(xx.shape)} and weight {list(weight.shape)}: expected [B, T+K-1, D], [D, K]")
    _float("short_conv", "xx", xx)
    _want("short_conv", "weight", weight, weight.shape, xx)
    return _impl("short_conv", xx, weight.shape[1]).conv_fwd(xx, weight).contiguous()


@conv_fwd.register_fake
def _(xx, weight):
    B, TK, D = xx.shape
    return xx.new_empty(B, TK - weight.shape[1] + 1, D)


@_define("spike_ops::conv_bwd")
def conv_bwd(xx: Tensor, weight: Tensor, gy: Tensor) -> tuple[Tensor, Tensor]:
    gxx, gw = _impl("short_conv", xx, weight.shape[1]).conv_bwd(xx, weight, gy)
    return _c(gxx, gw.to(torch.promote_types(xx.dtype, torch.float32)))


@conv_bwd.register_fake
def _(xx, weight, gy):
    return torch.empty_like(xx, memory_format=torch.contiguous_format), \
        weight.new_empty(weight.shape, dtype=torch.promote_types(xx.dtype, torch.float32))


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, gy):
    xx, weight = ctx.saved_tensors
    gxx, gw = conv_bwd(xx, weight, gy)
    return gxx, gw.to(weight.dtype)


conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


# ------------------------------------------------------------------ q/k/v split with L2-normalised q and k


@_define("spike_ops::split_fwd")
def split_fwd(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """qkv [B, T, 3 H D] -> (q, k, v [B, H, T, D], inv [B, 2, H, T]); q, k, inv in float32
    (float64 for float64 qkv), v in qkv's dtype."""
    if qkv.dim() != 3 or heads <= 0 or qkv.shape[-1] % (3 * heads):
        _fail("split_heads", f"qkv has shape {list(qkv.shape)}, expected [B, T, 3 * {heads} * D]")
    _float("split_heads", "qkv", qkv)
    return _c(*_impl("split_heads", qkv, qkv.shape[-1] // (3 * heads)).split_fwd(qkv, heads))


@split_fwd.register_fake
def _(qkv, heads):
    B, T, F3 = qkv.shape
    dt = torch.promote_types(qkv.dtype, torch.float32)
    D = F3 // (3 * heads)
    return (qkv.new_empty(B, heads, T, D, dtype=dt), qkv.new_empty(B, heads, T, D, dtype=dt),
            qkv.new_empty(B, heads, T, D), qkv.new_empty(B, 2, heads, T, dtype=dt))


@_define("spike_ops::split_bwd")
def split_bwd(q: Tensor, k: Tensor, inv: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
    return _impl("split_heads", dv, q.shape[-1]).split_bwd(q, k, inv, dq, dk, dv, dv.dtype).to(dv.dtype).contiguous()


@split_bwd.register_fake
def _(q, k, inv, dq, dk, dv):
    B, H, T, D = q.shape
    return dv.new_empty(B, T, 3 * H * D)


def _split_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0], output[1], output[3])


def _split_backward(ctx, dq, dk, dv, _dinv):
    q, k, inv = ctx.saved_tensors
    return split_bwd(q, k, inv, dq, dk, dv), None


split_fwd.register_autograd(_split_backward, setup_context=_split_setup)


# ------------------------------------------------------------------ gated RMSNorm


@_define("spike_ops::norm_fwd")
def norm_fwd(o: Tensor, gate: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """o, gate [B, T, H, D] (o any strides), weight [D] -> (y [B, T, H, D], rstd [B, T, H]) in
    float32 (float64 for float64 o)."""
    if o.dim() != 4:
        _fail("gated_rmsnorm", f"o has shape {list(o.shape)}, expected [B, T, H, D]")
    _float("gated_rmsnorm", "o", o)
    _want("gated_rmsnorm", "gate", gate, o.shape, o)
    _want("gated_rmsnorm", "weight", weight, o.shape[-1:], o)
    y, rstd = _impl("gated_rmsnorm", o, o.shape[-1]).norm_fwd(o, gate, weight, eps)
    dt = torch.promote_types(o.dtype, torch.float32)
    return _c(y.to(dt), rstd.to(dt))


@norm_fwd.register_fake
def _(o, gate, weight, eps):
    dt = torch.promote_types(o.dtype, torch.float32)
    return o.new_empty(o.shape, dtype=dt), o.new_empty(o.shape[:3], dtype=dt)


@_define("spike_ops::norm_bwd")
def norm_bwd(o: Tensor, gate: Tensor, weight: Tensor, rstd: Tensor, gy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    go, ggate, gw = _impl("gated_rmsnorm", o, o.shape[-1]).norm_bwd(o, gate, weight, rstd, gy)
    return _c(go, ggate.to(gate.dtype), gw.to(rstd.dtype))


@norm_bwd.register_fake
def _(o, gate, weight, rstd, gy):
    return (torch.empty_like(o, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format), weight.new_empty(weight.shape, dtype=rstd.dtype))


def _norm_setup(ctx, inputs, output):
    o, gate, weight, eps = inputs
    ctx.save_for_backward(o, gate, weight, output[1])


def _norm_backward(ctx, gy, _g_rstd):
    o, gate, weight, rstd = ctx.saved_tensors
    go, ggate, gw = norm_bwd(o, gate, weight, rstd, gy)
    return go, ggate, gw.to(weight.dtype), None


norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup)


# ------------------------------------------------------------------ chunked KDA


def _smallest_chunk(chunk_size: int) -> int:
    return chunk_sizes(chunk_size)[-1]


@_define("spike_ops::kda_fwd")
def kda_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, S0: Tensor, reset: Optional[Tensor],
            chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunked KDA over reference/kda.py's prepare_inputs (q scaled; q, k, g [B, H, T, dk];
    v [B, H, T, dv]; beta [B, H, T]; S0 [B, H, dk, dv]; reset [B, H, T] bool or None; float32)
    -> (O [B, H, T, dv], S_end, starts [B, H, N, dk, dv] the state each chunk starts from (N
    for the smallest chunk the call may take), chunk [1] int64: the chunk taken, negative
    when no chunk decays by at most e^-80 and the PyTorch sub-chunk form ran). The chunk is
    chosen here, at run time, from the decays: a data-dependent choice that torch.compile
    need not see."""
    if q.dim() != 4 or q.shape[2] == 0:
        _fail("kda", f"q has shape {list(q.shape)}, expected [B, H, T > 0, dk]")
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    for name, t, shape in (("q", q, q.shape), ("k", k, q.shape), ("g", g, q.shape), ("v", v, (B, H, T, dv)),
                           ("beta", beta, (B, H, T)), ("S0", S0, (B, H, dk, dv))):
        _want("kda", name, t, shape, q, torch.float32)
    _want("kda", "reset", reset, (B, H, T), q, torch.bool)
    c = chunk_inputs(q, k, v, g, beta, S0, reset, chunk_size)
    starts = q.new_zeros(B, H, -(-T // _smallest_chunk(chunk_size)), dk, dv)
    if not c.fast:  # some chunk decays by more than e^-80 even at the smallest chunk: the sub-chunk form
        with torch.no_grad():
            O, S = chunk_form(c, torch.float32)
        return O.contiguous(), S.contiguous(), starts, torch.tensor([-c.chunk])
    seg = None if c.seg is None else c.seg.flatten(2)
    O, S, st = _impl("kda", q, max(dk, dv)).kda_fwd(c.q, c.k, c.v, c.g, c.beta, c.S0, seg, c.chunk)
    starts[:, :, :st.shape[2]] = st
    return O[:, :, :T].contiguous(), S.contiguous(), starts, torch.tensor([c.chunk])


@kda_fwd.register_fake
def _(q, k, v, g, beta, S0, reset, chunk_size):
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    return (q.new_empty(B, H, T, dv), q.new_empty(B, H, dk, dv),
            q.new_empty(B, H, -(-T // _smallest_chunk(chunk_size)), dk, dv), q.new_empty(1, dtype=torch.int64))


def _sub_chunk_backward(q, k, v, g, beta, S0, reset, chunk_size, dO, dS_end):
    """The sub-chunk form's gradients by autograd, in a worker thread (autograd is off inside
    a custom op's kernel)."""
    def work():
        inputs = [x.detach().requires_grad_() for x in (q, k, v, g, beta, S0)]
        c = chunk_inputs(*inputs, reset, chunk_size)
        O, S = chunk_form(c, torch.float32)
        return torch.autograd.grad((O, S), inputs, (dO, dS_end), allow_unused=True)

    with ThreadPoolExecutor(1, thread_name_prefix="model.ops.kda") as pool:
        grads = pool.submit(work).result()
    return [torch.zeros_like(x) if d is None else d for x, d in zip((q, k, v, g, beta, S0), grads)]


@_define("spike_ops::kda_bwd")
def kda_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, S0: Tensor, reset: Optional[Tensor],
            starts: Tensor, chunk: Tensor, dO: Tensor, dS_end: Tensor,
            chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T = q.shape[2]
    C = int(chunk.item())
    if C < 0:
        return _c(*_sub_chunk_backward(q, k, v, g, beta, S0, reset, chunk_size, dO, dS_end))
    c = chunk_inputs(q, k, v, g, beta, S0, reset, chunk_size, chunk=C)
    N = c.q.shape[2] // C
    dO = torch.nn.functional.pad(dO.float(), (0, 0, 0, c.q.shape[2] - T))
    seg = None if c.seg is None else c.seg.flatten(2)
    dq, dk, dv, dg, dbeta, dS0 = _impl("kda", q, max(q.shape[-1], v.shape[-1])).kda_bwd(
        c.q, c.k, c.v, c.g, c.beta, seg, starts[:, :, :N], dO, dS_end, C)
    return _c(dq[:, :, :T], dk[:, :, :T], dv[:, :, :T], dg[:, :, :T], dbeta[:, :, :T], dS0)


@kda_bwd.register_fake
def _(q, k, v, g, beta, S0, reset, starts, chunk, dO, dS_end, chunk_size):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty_like(S0))


def _kda_setup(ctx, inputs, output):
    q, k, v, g, beta, S0, reset, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta, S0, reset, output[2], output[3])
    ctx.chunk_size = chunk_size


def _kda_backward(ctx, dO, dS_end, _d_starts, _d_chunk):
    q, k, v, g, beta, S0, reset, starts, chunk = ctx.saved_tensors
    grads = kda_bwd(q, k, v, g, beta, S0, reset, starts, chunk, dO, dS_end, ctx.chunk_size)
    return (*grads, None, None)


kda_fwd.register_autograd(_kda_backward, setup_context=_kda_setup)
