"""The compiled C loops as plain functions on CPU tensors (no autograd: model/ops/library.py
registers them as the CPU kernels of the `spike_ops` custom ops, whose autograd calls
the `*_bwd` functions). Each has the kernel-form contract that model/ops/reference/forms.py
states in PyTorch and model/ops/triton/ implements for CUDA; float32 or float64 tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import compiled, row_pointer, run_rows

NORM_EPS = 1e-12  # F.normalize's default


def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def lif_fwd(drive, a, beta_logit, membrane, keep, decay: float, threshold: float):
    """-> (spikes, final membrane, log_alpha or None, beta, v_all); see forms.lif_fwd."""
    x, bl, a, k = drive.contiguous(), beta_logit.to(drive.dtype).contiguous(), _c(a), _c(keep)
    B, T, H, D = x.shape
    N, size = H * D, x.element_size()
    v_all, spikes = torch.empty_like(x), torch.empty_like(x)
    log_alpha = None if a is None else torch.empty_like(x)
    beta = torch.empty(B, T, H, dtype=x.dtype)
    m = membrane.to(x.dtype).clone(memory_format=torch.contiguous_format)
    fn = compiled("lif_scan", "lif_modulate_forward", x.dtype)
    at = row_pointer(size)
    run_rows(B, lambda _, b0, b1, th: fn(at(x, b0, T * N), at(a, b0, T * N), at(bl, b0, T * H), at(k, b0, T),
                                       at(v_all, b0, T * N), at(spikes, b0, T * N), at(log_alpha, b0, T * N),
                                       at(beta, b0, T * H), at(m, b0, N), b1 - b0, T, H, D, decay, threshold, th))
    return spikes, m, log_alpha, beta, v_all


def lif_bwd(v_all, a, beta_logit, keep, g_spikes, g_m, g_log_alpha, g_beta, decay: float, threshold: float,
            slope: float):
    """-> (grad drive, grad a or None, grad beta_logit, grad initial membrane)."""
    B, T, H, D = v_all.shape
    N, size, dt = H * D, v_all.element_size(), v_all.dtype
    v_all, a, bl, k = v_all.contiguous(), _c(a), beta_logit.to(dt).contiguous(), _c(keep)
    g_spikes, g_m, g_log_alpha, g_beta = (None if g is None else g.to(dt).contiguous()
                                          for g in (g_spikes, g_m, g_log_alpha, g_beta))
    if a is None:
        g_log_alpha = None
    grad_drive, grad_a = torch.empty_like(v_all), None if a is None else torch.empty_like(v_all)
    grad_bl, grad_m0 = torch.empty(B, T, H, dtype=dt), torch.empty(B, H, D, dtype=dt)
    fn = compiled("lif_scan", "lif_modulate_backward", dt)
    at = row_pointer(size)
    run_rows(B, lambda _, b0, b1, th: fn(at(v_all, b0, T * N), at(a, b0, T * N), at(bl, b0, T * H), at(k, b0, T),
                                       at(g_spikes, b0, T * N), at(g_m, b0, N), at(g_log_alpha, b0, T * N),
                                       at(g_beta, b0, T * H), at(grad_drive, b0, T * N), at(grad_a, b0, T * N),
                                       at(grad_bl, b0, T * H), at(grad_m0, b0, N), b1 - b0, T, H, D, decay,
                                       threshold, slope, th))
    return grad_drive, grad_a, grad_bl, grad_m0


def conv_fwd(xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y [B, T, D] = causal depthwise conv of xx [B, T+K-1, D] with weight [D, K]."""
    xx = xx.contiguous()
    B, TK, D = xx.shape
    K = weight.shape[1]
    T = TK - K + 1
    w = weight.to(xx.dtype).t().contiguous()  # [K, D]
    y = torch.empty(B, T, D, dtype=xx.dtype)
    fn, size = compiled("short_conv", "short_conv_forward", xx.dtype), xx.element_size()
    run_rows(B, lambda _, b0, b1, th: fn(xx.data_ptr() + b0 * TK * D * size, w.data_ptr(),
                                       y.data_ptr() + b0 * T * D * size, 0, b1 - b0, T, D, K, th))
    return y


def conv_bwd(xx: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad xx [B, T+K-1, D], grad weight [D, K] in xx's dtype)."""
    xx, gy = xx.contiguous(), gy.to(xx.dtype).contiguous()
    B, TK, D = xx.shape
    K = weight.shape[1]
    T = TK - K + 1
    w = weight.to(xx.dtype).t().contiguous()
    gxx = torch.empty_like(xx)
    gw = torch.empty(B, K, D, dtype=xx.dtype)  # each row's share, summed in a fixed order below
    fn, size = compiled("short_conv", "short_conv_backward", xx.dtype), xx.element_size()
    run_rows(B, lambda _, b0, b1, th: fn(xx.data_ptr() + b0 * TK * D * size, w.data_ptr(),
                                       gy.data_ptr() + b0 * T * D * size, gxx.data_ptr() + b0 * TK * D * size,
                                       gw.data_ptr() + b0 * K * D * size, 0, b1 - b0, T, D, K, th))
    return gxx, gw.sum(0).t().contiguous()


def split_fwd(qkv: torch.Tensor, heads: int):
    """qkv [B, T, 3 H D] -> (q, k, v [B, H, T, D], q and k L2-normalised; inv [B, 2, H, T])."""
    x = qkv.contiguous()
    B, T, F3 = x.shape
    H, D = heads, F3 // (3 * heads)
    q, k, v = (torch.empty(B, H, T, D, dtype=x.dtype) for _ in range(3))
    inv = torch.empty(B, 2, H, T, dtype=x.dtype)
    fn, size = compiled("split_heads", "split_heads_forward", x.dtype), x.element_size()
    run_rows(B, lambda _, b0, b1, th: fn(x.data_ptr() + b0 * T * F3 * size,
                                       *(t.data_ptr() + b0 * H * T * D * size for t in (q, k, v)),
                                       inv.data_ptr() + b0 * 2 * H * T * size, b1 - b0, T, H, D, NORM_EPS, th))
    return q, k, v, inv


def split_bwd(q, k, inv, dq, dk, dv, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """-> grad qkv [B, T, 3 H D] in q's dtype (the loop takes float32 or float64 qkv: `dtype` is q's)."""
    B, H, T, D = q.shape
    grads = [None if g is None else g.to(q.dtype).contiguous() for g in (dq, dk, dv)]
    dqkv = torch.empty(B, T, 3 * H * D, dtype=q.dtype)
    fn, size = compiled("split_heads", "split_heads_backward", q.dtype), q.element_size()
    at = lambda t, b0: None if t is None else t.data_ptr() + b0 * H * T * D * size  # noqa: E731
    run_rows(B, lambda _, b0, b1, th: fn(at(q, b0), at(k, b0), inv.data_ptr() + b0 * 2 * H * T * size,
                                       *(at(g, b0) for g in grads), dqkv.data_ptr() + b0 * T * 3 * H * D * size,
                                       b1 - b0, T, H, D, NORM_EPS, th))
    return dqkv


def norm_fwd(o, gate, weight, eps: float):
    """RMSNorm(o) * weight * silu(gate) over D: o, gate [B, T, H, D] (o any strides with a unit
    last one) -> (y [B, T, H, D] contiguous in o's dtype, rstd [B, T, H])."""
    if o.stride(-1) != 1:
        o = o.contiguous()
    gate, w = gate.to(o.dtype).contiguous(), weight.to(o.dtype).contiguous()
    B, T, H, D = o.shape
    sb, st, sh, _ = o.stride()
    y, rstd = torch.empty(B, T, H, D, dtype=o.dtype), torch.empty(B, T, H, dtype=o.dtype)
    fn, es = compiled("gated_norm", "gated_norm_forward", o.dtype), o.element_size()
    run_rows(B, lambda _, b0, b1, th: fn(o.data_ptr() + b0 * sb * es, sb, st, sh,
                                         gate.data_ptr() + b0 * T * H * D * es, w.data_ptr(),
                                         y.data_ptr() + b0 * T * H * D * es, rstd.data_ptr() + b0 * T * H * es,
                                         b1 - b0, T, H, D, eps, th))
    return y, rstd


def norm_bwd(o, gate, weight, rstd, gy):
    """-> (grad o (o's strides), grad gate, grad weight [D] in o's dtype)."""
    if o.stride(-1) != 1:
        o = o.contiguous()
    gate, w = gate.to(o.dtype).contiguous(), weight.to(o.dtype).contiguous()
    gy, rstd = gy.to(o.dtype).contiguous(), rstd.contiguous()
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
    return go, ggate, gw.sum(0)
