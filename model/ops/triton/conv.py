"""ShortConv's causal depthwise convolution as Triton kernels (the contract of
model/ops/reference/forms.py's conv_fwd / conv_bwd): y[b, t] = sum_j w[:, j] * xx[b, t + j]
for xx [B, T+K-1, D] (the layer's carried tail already prepended), w [D, K], K a
compile-time constant. One program per (batch row, block of TOKENS positions, block of
CHANNELS channels); the weight's gradient is summed per program, then over programs in
PyTorch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS = 32
CHANNELS = 64
WARPS = 8  # a [TOKENS, CHANNELS] tile: 8 elements a thread per tensor


@triton.jit
def conv_fwd_kernel(xx, w, y, T, D, K: tl.constexpr, TOKENS: tl.constexpr, CHANNELS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS).to(tl.int64)
    d = tl.program_id(2) * CHANNELS + tl.arange(0, CHANNELS)
    dmask = d < D
    mask = (t < T)[:, None] & dmask[None, :]
    TK = T + K - 1
    acc = tl.zeros([TOKENS, CHANNELS], dtype=tl.float32)
    for j in tl.static_range(K):
        x = tl.load(xx + (b * TK + t + j)[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        wj = tl.load(w + d * K + j, mask=dmask, other=0.0).to(tl.float32)
        acc += x * wj[None, :]
    tl.store(y + (b * T + t)[:, None] * D + d[None, :], acc.to(y.dtype.element_ty), mask=mask)


@triton.jit
def conv_bwd_kernel(xx, w, gy, gxx, gw_part, T, D, K: tl.constexpr, TOKENS: tl.constexpr, CHANNELS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    s = tb * TOKENS + tl.arange(0, TOKENS).to(tl.int64)  # input positions (for gxx) / outputs (for gw)
    d = tl.program_id(2) * CHANNELS + tl.arange(0, CHANNELS)
    dmask = d < D
    TK = T + K - 1
    acc = tl.zeros([TOKENS, CHANNELS], dtype=tl.float32)
    part = ((b * tl.num_programs(1) + tb) * K) * D
    for j in tl.static_range(K):
        wj = tl.load(w + d * K + j, mask=dmask, other=0.0).to(tl.float32)
        # xx[s] feeds y[s - j]
        src = s - j
        ok = (src >= 0) & (src < T) & (s < TK)
        g = tl.load(gy + (b * T + src)[:, None] * D + d[None, :], mask=ok[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        acc += g * wj[None, :]
        # grad w[:, j] over outputs t = s of this block: gy[t] * xx[t + j]
        tm = (s < T)[:, None] & dmask[None, :]
        gt = tl.load(gy + (b * T + s)[:, None] * D + d[None, :], mask=tm, other=0.0).to(tl.float32)
        x = tl.load(xx + (b * TK + s + j)[:, None] * D + d[None, :], mask=tm, other=0.0).to(tl.float32)
        tl.store(gw_part + part + j * D + d, tl.sum(gt * x, axis=0), mask=dmask)
    mask = (s < TK)[:, None] & dmask[None, :]
    tl.store(gxx + (b * TK + s)[:, None] * D + d[None, :], acc.to(gxx.dtype.element_ty), mask=mask)


def conv_fwd(xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """-> y [B, T, D] in xx's dtype."""
    xx = xx.contiguous()
    B, TK, D = xx.shape
    K = weight.shape[1]
    T = TK - K + 1
    y = torch.empty(B, T, D, dtype=xx.dtype, device=xx.device)
    grid = (B, triton.cdiv(T, TOKENS), triton.cdiv(D, CHANNELS))
    conv_fwd_kernel[grid](xx, weight.contiguous(), y, T, D, K=K, TOKENS=TOKENS, CHANNELS=CHANNELS, num_warps=WARPS)
    return y


def conv_bwd(xx: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad xx in xx's dtype, grad weight [D, K] float32)."""
    xx, gy = xx.contiguous(), gy.contiguous()
    B, TK, D = xx.shape
    K = weight.shape[1]
    T = TK - K + 1
    gxx = torch.empty_like(xx)
    nt = triton.cdiv(TK, TOKENS)
    gw_part = torch.empty(B, nt, K, D, dtype=torch.float32, device=xx.device)
    grid = (B, nt, triton.cdiv(D, CHANNELS))
    conv_bwd_kernel[grid](xx, weight.contiguous(), gy, gxx, gw_part, T, D, K=K, TOKENS=TOKENS, CHANNELS=CHANNELS,
                          num_warps=WARPS)
    return gxx, gw_part.sum((0, 1)).t().contiguous()
