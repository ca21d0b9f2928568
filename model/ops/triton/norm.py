"""Spike-KDA's gated RMSNorm, RMSNorm(o) * weight * silu(gate) over the head's D channels,
as Triton kernels (the contract of model/ops/reference/forms.py's norm_fwd / norm_bwd):
one program per block of ROWS (batch, token, head) rows, a row's D channels in one block.
o may be a strided view (the KDA's [B, H, T, D] output transposed); y and the statistics
are float32; the weight's gradient is summed per program, then over programs in PyTorch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block

ROWS = 16


def _warps(block_d: int) -> int:
    """One warp per 256 elements of the [ROWS, BLOCK_D] tile (8 a thread per tensor), 1 to 8."""
    return max(1, min(8, ROWS * block_d // 256))


@triton.jit
def _row_offsets(pid, R, T, H, sb, st, sh, ROWS: tl.constexpr):
    r = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    b = r // (T * H)
    t = (r // H) % T
    h = r % H
    return r, r < R, b * sb + t * st + h * sh


@triton.jit
def norm_fwd_kernel(o, gate, weight, y, rstd, R, T, H, D, sb, st, sh, eps,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r, rmask, o_off = _row_offsets(pid, R, T, H, sb, st, sh, ROWS)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    mask = rmask[:, None] & dmask[None, :]
    x = tl.load(o + o_off[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + d, mask=dmask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    out = x * inv[:, None] * w[None, :] * (g / (1.0 + tl.exp(-g)))
    tl.store(y + r[:, None] * D + d[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + r, inv, mask=rmask)


@triton.jit
def norm_bwd_kernel(o, gate, weight, rstd, gy, go, ggate, gw_part, R, T, H, D, sb, st, sh,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r, rmask, o_off = _row_offsets(pid, R, T, H, sb, st, sh, ROWS)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    mask = rmask[:, None] & dmask[None, :]
    x = tl.load(o + o_off[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(gy + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + d, mask=dmask, other=0.0).to(tl.float32)
    inv = tl.load(rstd + r, mask=rmask, other=0.0)
    xhat = x * inv[:, None]
    sg = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sg
    gn = dy * w[None, :] * silu
    dx = inv[:, None] * (gn - xhat * (tl.sum(gn * xhat, axis=1) / D)[:, None])
    dg = dy * xhat * w[None, :] * sg * (1.0 + g * (1.0 - sg))
    tl.store(go + o_off[:, None] + d[None, :], dx.to(go.dtype.element_ty), mask=mask)
    tl.store(ggate + r[:, None] * D + d[None, :], dg.to(ggate.dtype.element_ty), mask=mask)
    tl.store(gw_part + pid * D + d, tl.sum(dy * xhat * silu, axis=0), mask=dmask)


def _strides(o: torch.Tensor):
    if o.stride(-1) != 1:
        o = o.contiguous()
    return o, o.stride()[:3]


def norm_fwd(o, gate, weight, eps: float):
    """o, gate [B, T, H, D] -> (y [B, T, H, D] float32, rstd [B, T, H] float32)."""
    o, (sb, st, sh) = _strides(o)
    B, T, H, D = o.shape
    R = B * T * H
    y = torch.empty(B, T, H, D, dtype=torch.float32, device=o.device)
    rstd = torch.empty(B, T, H, dtype=torch.float32, device=o.device)
    BD = block(D)
    norm_fwd_kernel[(triton.cdiv(R, ROWS),)](o, gate.contiguous(), weight.contiguous(), y, rstd, R, T, H, D,
                                             sb, st, sh, float(eps), ROWS=ROWS, BLOCK_D=BD, num_warps=_warps(BD))
    return y, rstd


def norm_bwd(o, gate, weight, rstd, gy):
    """-> (grad o in o's dtype and strides, grad gate, grad weight [D] float32)."""
    o, (sb, st, sh) = _strides(o)
    B, T, H, D = o.shape
    R = B * T * H
    gate = gate.contiguous()
    go = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device)
    ggate = torch.empty_like(gate)
    n = triton.cdiv(R, ROWS)
    gw_part = torch.empty(n, D, dtype=torch.float32, device=o.device)
    BD = block(D)
    norm_bwd_kernel[(n,)](o, gate, weight.contiguous(), rstd.contiguous(), gy.contiguous(), go, ggate, gw_part,
                          R, T, H, D, sb, st, sh, ROWS=ROWS, BLOCK_D=BD, num_warps=_warps(BD))
    return go, ggate, gw_part.sum(0)
