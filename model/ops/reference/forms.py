"""The kernel forms in PyTorch: what each `spike_ops` custom op computes (model/ops/library.py),
stated with the same arguments and results as its compiled C loop (model/ops/cpu/loops.py)
and Triton kernel (model/ops/triton/), forward and backward as separate functions (the
backward given what the forward saved). They run where no fast form serves (a dtype the C
loop does not take, a CUDA op with no Triton kernel, a fast form the first-call check
turned off), so the custom ops always have a kernel. Tests hold them to the references
(layer.py, lif.py, kda.py), which stay the specification.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from .kda import _KDAChunkFn, _sub_chunk
from .layer import depthwise_conv_reference
from .lif import _lif_forward, surrogate_grad

NORM_EPS = 1e-12  # F.normalize's default


def lif_fwd(drive, a, beta_logit, membrane, keep, decay: float, threshold: float):
    """drive, a [B, T, H, D] (a may be None: no alpha modulation); beta_logit [B, T, H];
    membrane [B, H, D]; keep [B, T] (0.0 at a document start) or None. Returns (spikes,
    final membrane, log_alpha = -a * spikes or None, beta = sigmoid(beta_logit) *
    mean_D(spikes), v_all the membrane potentials before each spike decision)."""
    B, T = drive.shape[:2]
    k = None if keep is None else keep.to(drive.dtype).view(B, T, 1, 1)
    v_all, spikes, m = _lif_forward(drive, membrane.to(drive.dtype), k, decay, threshold)
    log_alpha = None if a is None else -a * spikes
    beta = torch.sigmoid(beta_logit.to(drive.dtype)) * spikes.mean(-1)
    return spikes, m, log_alpha, beta, v_all


def lif_bwd(v_all, a, beta_logit, keep, g_spikes, g_m, g_log_alpha, g_beta, decay: float, threshold: float,
            slope: float):
    """-> (grad drive, grad a or None, grad beta_logit, grad initial membrane); any grad may be
    None (zero). The membrane's gradient is the leaky reverse scan of lif.py (the reset
    path treated as a constant), the spike's the fast-sigmoid surrogate."""
    B, T, H, D = v_all.shape
    s = (v_all >= threshold).to(v_all.dtype)
    sig = torch.sigmoid(beta_logit.to(v_all.dtype))
    gs = torch.zeros_like(v_all) if g_spikes is None else g_spikes.to(v_all.dtype).clone()
    g_a = None
    if a is not None and g_log_alpha is not None:
        gs = gs - a * g_log_alpha
        g_a = -s * g_log_alpha
    elif a is not None:
        g_a = torch.zeros_like(v_all)
    if g_beta is not None:
        gs = gs + (g_beta * sig / D)[..., None]
        g_bl = g_beta * s.mean(-1) * sig * (1 - sig)
    else:
        g_bl = torch.zeros_like(sig)
    direct = surrogate_grad(v_all - threshold, slope) * gs
    grad = torch.empty_like(v_all)
    gm = torch.zeros_like(v_all[:, 0]) if g_m is None else g_m.to(v_all.dtype)
    for t in range(T - 1, -1, -1):
        grad[:, t] = direct[:, t] + gm
        gm = grad[:, t] * (decay if keep is None else decay * keep[:, t, None, None].to(v_all.dtype))
    return grad, g_a, g_bl, gm


def conv_fwd(xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y [B, T, D] = sum_j weight[:, j] * xx[:, t + j] for xx [B, T+K-1, D], weight [D, K]."""
    return depthwise_conv_reference(xx, weight)


def conv_bwd(xx: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad xx, grad weight [D, K] in float32, or float64 for float64 xx)."""
    K, T = weight.shape[1], gy.shape[1]
    dt = torch.promote_types(xx.dtype, torch.float32)
    w, gy, x = weight.to(dt), gy.to(dt), xx.to(dt)
    gxx = torch.zeros_like(x)
    gw = torch.empty(K, xx.shape[-1], dtype=dt, device=xx.device)
    for j in range(K):
        gxx[:, j:j + T] += gy * w[:, j]
        gw[j] = (gy * x[:, j:j + T]).sum((0, 1))
    return gxx.to(xx.dtype), gw.t().contiguous()


def split_fwd(qkv: torch.Tensor, heads: int):
    """qkv [B, T, 3 H D] -> (q, k, v [B, H, T, D] contiguous, q and k L2-normalised in float32
    (float64 for float64 qkv), v in qkv's dtype; inv [B, 2, H, T] the reciprocal norms
    1 / max(|x|, 1e-12) of q and k)."""
    B, T, F3 = qkv.shape
    x = qkv.view(B, T, 3, heads, F3 // (3 * heads)).permute(2, 0, 3, 1, 4)  # [3, B, H, T, D]
    qk = x[:2].to(torch.promote_types(qkv.dtype, torch.float32))
    inv = qk.norm(dim=-1).clamp_min(NORM_EPS).reciprocal()  # [2, B, H, T]
    q, k = (qk[i] * inv[i][..., None] for i in range(2))
    return q.contiguous(), k.contiguous(), x[2].clone(memory_format=torch.contiguous_format), \
        inv.transpose(0, 1).contiguous()


def split_bwd(q, k, inv, dq, dk, dv, dtype: torch.dtype) -> torch.Tensor:
    """-> grad qkv [B, T, 3 H D] in `dtype`: (g - y (y . g)) / |x| for the normalised q and k
    (g / 1e-12 where |x| < 1e-12), g for v."""
    B, H, T, D = q.shape
    parts = []
    for i, (y, g) in enumerate(((q, dq), (k, dk))):
        if g is None:
            parts.append(torch.zeros_like(y))
            continue
        g = g.to(y.dtype)
        r = inv[:, i][..., None]
        tiny = r >= 1 / NORM_EPS  # clamped: x / eps, linear
        parts.append(torch.where(tiny, g * r, (g - y * (y * g).sum(-1, keepdim=True)) * r))
    parts.append(torch.zeros_like(q) if dv is None else dv.to(q.dtype))
    return torch.stack(parts, 0).permute(1, 3, 0, 2, 4).reshape(B, T, 3 * H * D).to(dtype)


def norm_fwd(o, gate, weight, eps: float):
    """RMSNorm(o) * weight * silu(gate) over D, computed and returned in float32 (float64 for
    float64 o): o, gate [B, T, H, D] -> (y, rstd [B, T, H])."""
    dt = torch.promote_types(o.dtype, torch.float32)
    x, gt, w = o.to(dt), gate.to(dt), weight.to(dt)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + eps)
    return (x * rstd[..., None]) * w * F.silu(gt), rstd


def norm_bwd(o, gate, weight, rstd, gy):
    """-> (grad o, grad gate, grad weight [D])."""
    dt = rstd.dtype
    x, gt, w, gy = o.to(dt), gate.to(dt), weight.to(dt), gy.to(dt)
    xhat = x * rstd[..., None]
    sg = torch.sigmoid(gt)
    silu = gt * sg
    gn = gy * w * silu  # gradient of the normalised x
    go = rstd[..., None] * (gn - xhat * (gn * xhat).mean(-1, keepdim=True))
    ggate = gy * xhat * w * sg * (1 + gt * (1 - sg))
    gw = (gy * xhat * silu).flatten(0, -2).sum(0)
    return go.to(o.dtype), ggate.to(gate.dtype), gw


def _stub():
    ctx = SimpleNamespace()
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    return ctx


def _chunked(x: torch.Tensor, chunk: int) -> torch.Tensor:
    return x.unflatten(2, (x.shape[2] // chunk, chunk))


def kda_fwd(q, k, v, g, beta, S0, seg: Optional[torch.Tensor], chunk: int):
    """kda.py's `_KDAChunkFn` over [B, H, T, d] inputs (T a multiple of chunk; seg [B, H, T]
    or None): (O [B, H, T, dv], S_end, starts [B, H, T / chunk, dk, dv])."""
    ctx = _stub()
    args = [_chunked(x, chunk) for x in (q, k, v, g, beta)]
    with torch.no_grad():
        O, S = _KDAChunkFn.forward(ctx, *args, S0, None if seg is None else _chunked(seg, chunk), _sub_chunk(chunk))
    return O.flatten(2, 3), S, ctx.saved_tensors[17]


def kda_bwd(q, k, v, g, beta, seg, starts, dO, dS_end, chunk: int):
    """-> (dq, dk, dv, dg, dbeta, dS0), recomputing the forward (`starts` not needed)."""
    B, H, T, dv = v.shape
    ctx = _stub()
    args = [_chunked(x, chunk) for x in (q, k, v, g, beta)]
    with torch.no_grad():
        S0 = torch.zeros_like(starts[:, :, 0])
        # the state each chunk starts from depends on S0 only through chunk 0's start
        S0.copy_(starts[:, :, 0])
        _KDAChunkFn.forward(ctx, *args, S0, None if seg is None else _chunked(seg, chunk), _sub_chunk(chunk))
        dO = torch.zeros_like(v) if dO is None else dO
        grads = _KDAChunkFn.backward(ctx, _chunked(dO.to(v.dtype).contiguous(), chunk), dS_end)
    dq, dk, dv_, dg, dbeta, dS0 = grads[:6]
    return dq.flatten(2, 3), dk.flatten(2, 3), dv_.flatten(2, 3), dg.flatten(2, 3), dbeta.flatten(2, 3), dS0
