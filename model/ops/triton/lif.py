"""The LIF scan with Spike-KDA's alpha/beta modulation as Triton kernels (the contract of
model/ops/reference/forms.py's lif_fwd / lif_bwd): one program per (batch row, head),
the head's D channels in one block, a sequential loop over tokens carrying the membrane
(forward) or its gradient (backward) in registers. A head's spike count is a sum of 0/1
values, exact in any order. The forward is compiled without multiply-add fusion
(enable_fp_fusion=False), so `drive + decay * m` rounds as the reference's (and the C
loop's, built with -ffp-contract=off) and the spikes are the reference's, bit for bit."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block, warps


@triton.jit
def lif_fwd_kernel(drive, a, beta_logit, keep, m0, v_all, spikes, log_alpha, beta, m_out,
                   T, H, D, decay, threshold,
                   HAS_A: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b = pid // H
    h = pid % H
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    N = H * D
    base = b * T * N + h * D
    head_row = b * T * H + h
    m = tl.load(m0 + pid * D + d, mask=mask, other=0.0).to(tl.float32)
    for t in range(T):
        if HAS_KEEP:
            m = m * tl.load(keep + b * T + t).to(tl.float32)
        off = base + t * N + d
        v = tl.load(drive + off, mask=mask, other=0.0).to(tl.float32) + decay * m
        fired = v >= threshold
        s = tl.where(fired, 1.0, 0.0)
        tl.store(v_all + off, v.to(v_all.dtype.element_ty), mask=mask)
        tl.store(spikes + off, s.to(spikes.dtype.element_ty), mask=mask)
        if HAS_A:
            av = tl.load(a + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(log_alpha + off, (-av * s).to(log_alpha.dtype.element_ty), mask=mask)
        m = tl.where(fired, v - threshold, v)
        count = tl.sum(tl.where(mask, s, 0.0), axis=0)
        bl = tl.load(beta_logit + head_row + t * H).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-bl))
        tl.store(beta + head_row + t * H, (sig * count / D).to(beta.dtype.element_ty))
    tl.store(m_out + pid * D + d, m.to(m_out.dtype.element_ty), mask=mask)


@triton.jit
def lif_bwd_kernel(v_all, a, beta_logit, keep, g_spikes, g_m, g_log_alpha, g_beta,
                   g_drive, g_a, g_bl, g_m0,
                   T, H, D, decay, threshold, slope,
                   HAS_A: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_GS: tl.constexpr, HAS_GM: tl.constexpr,
                   HAS_GLA: tl.constexpr, HAS_GB: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    N = H * D
    base = b * T * N + h * D
    head_row = b * T * H + h
    gm = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_GM:
        gm = tl.load(g_m + pid * D + d, mask=mask, other=0.0).to(tl.float32)
    for i in range(T):
        t = T - 1 - i
        off = base + t * N + d
        v = tl.load(v_all + off, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(v >= threshold, 1.0, 0.0)
        gs = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_GS:
            gs = tl.load(g_spikes + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_A:
            gla = tl.zeros([BLOCK_D], dtype=tl.float32)
            if HAS_GLA:
                gla = tl.load(g_log_alpha + off, mask=mask, other=0.0).to(tl.float32)
            av = tl.load(a + off, mask=mask, other=0.0).to(tl.float32)
            gs = gs - av * gla
            tl.store(g_a + off, (-s * gla).to(g_a.dtype.element_ty), mask=mask)
        bl = tl.load(beta_logit + head_row + t * H).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-bl))
        gb = 0.0
        if HAS_GB:
            gb = tl.load(g_beta + head_row + t * H).to(tl.float32)
        gs = gs + gb * sig / D
        count = tl.sum(tl.where(mask, s, 0.0), axis=0)
        tl.store(g_bl + head_row + t * H, (gb * (count / D) * sig * (1.0 - sig)).to(g_bl.dtype.element_ty))
        x = tl.abs(v - threshold) * slope + 1.0
        gv = gs / (x * x) + gm
        tl.store(g_drive + off, gv.to(g_drive.dtype.element_ty), mask=mask)
        if HAS_KEEP:
            gm = gv * (decay * tl.load(keep + b * T + t).to(tl.float32))
        else:
            gm = gv * decay
    tl.store(g_m0 + pid * D + d, gm.to(g_m0.dtype.element_ty), mask=mask)


def lif_fwd(drive, a, beta_logit, membrane, keep, decay: float, threshold: float):
    """-> (spikes, final membrane, log_alpha or None, beta, v_all), in drive's dtype."""
    x = drive.contiguous()
    B, T, H, D = x.shape
    a = None if a is None else a.contiguous()
    bl, m0 = beta_logit.contiguous(), membrane.contiguous()
    k = None if keep is None else keep.contiguous()
    v_all, spikes = torch.empty_like(x), torch.empty_like(x)
    log_alpha = None if a is None else torch.empty_like(x)
    beta = torch.empty(B, T, H, dtype=x.dtype, device=x.device)
    m = torch.empty(B, H, D, dtype=x.dtype, device=x.device)
    BD = block(D)
    lif_fwd_kernel[(B * H,)](x, x if a is None else a, bl, x if k is None else k, m0, v_all, spikes,
                             x if log_alpha is None else log_alpha, beta, m, T, H, D, float(decay), float(threshold),
                             HAS_A=a is not None, HAS_KEEP=k is not None, BLOCK_D=BD, num_warps=warps(BD),
                             enable_fp_fusion=False)
    return spikes, m, log_alpha, beta, v_all


def lif_bwd(v_all, a, beta_logit, keep, g_spikes, g_m, g_log_alpha, g_beta, decay: float, threshold: float,
            slope: float):
    """-> (grad drive, grad a or None, grad beta_logit, grad initial membrane)."""
    v = v_all.contiguous()
    B, T, H, D = v.shape
    c = [None if t is None else t.contiguous() for t in (a, keep, g_spikes, g_m, g_log_alpha, g_beta)]
    a, k, gs, gm, gla, gb = c
    g_drive = torch.empty_like(v)
    g_a = None if a is None else torch.empty_like(v)
    g_bl = torch.empty(B, T, H, dtype=v.dtype, device=v.device)
    g_m0 = torch.empty(B, H, D, dtype=v.dtype, device=v.device)
    BD = block(D)
    lif_bwd_kernel[(B * H,)](v, v if a is None else a, beta_logit.contiguous(), v if k is None else k,
                             v if gs is None else gs, v if gm is None else gm, v if gla is None else gla,
                             v if gb is None else gb, g_drive, v if g_a is None else g_a, g_bl, g_m0,
                             T, H, D, float(decay), float(threshold), float(slope),
                             HAS_A=a is not None, HAS_KEEP=k is not None, HAS_GS=gs is not None,
                             HAS_GM=gm is not None, HAS_GLA=gla is not None, HAS_GB=gb is not None,
                             BLOCK_D=BD, num_warps=warps(BD))
    return g_drive, g_a, g_bl, g_m0
