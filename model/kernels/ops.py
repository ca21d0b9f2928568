"""The fused ops as autograd Functions over a kernel backend.

A backend runs a named launcher on a parameter struct: the compiled CUDA extension
(`build.CudaBackend`) on GPU tensors, or the host emulation of the same kernel source
(`emu.EmuBackend`) on CPU tensors, which is how the kernels are tested without a GPU.
This module owns everything else: shape and dtype handling, output allocation, strides,
and the structs, so that both backends run exactly the same Python.

Every output is allocated here; with `SPIKE_KERNELS_POISON=1` in the environment (or
`ops.POISON = True`) outputs are filled with NaN first, so an element a kernel fails to
write shows up as NaN in the tests.

The ctypes structs mirror `sk::LifParams`, `sk::KdaParams` and `sk::RmsParams` in
csrc/*.cuh field for field (only 8-byte fields: pointers, int64, double); each backend
checks their sizes against the compiled ones before its first launch.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

POISON = os.environ.get("SPIKE_KERNELS_POISON", "") not in ("", "0")

# must match csrc/common.cuh and csrc/kda.cuh
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
KDA_ROWS, KDA_THREADS, KDA_CHUNK = 8, 128, 16
KDA_MAX_DK = 256
LIF_MAX_CHANNELS = 1024
RMS_WARPS = 8

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_S3 = ctypes.c_int64 * 3


class LifParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in (
        "drive", "a", "beta_logit", "membrane", "reset", "spikes", "log_alpha", "beta", "v_save", "membrane_out",
        "v", "g_spikes", "g_log_alpha", "g_beta", "g_membrane", "d_drive", "d_a", "d_beta_logit", "d_membrane")]
    _fields_ += [(n, _I) for n in ("B", "T", "H", "N")] + [(n, _D) for n in ("decay", "threshold", "slope")]


class KdaParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in (
        "q", "k", "v", "g", "beta", "reset", "s0", "o", "s_final", "ckpt",
        "d_o", "d_sfinal", "dq", "dk", "dg", "dbeta", "dv", "ds0")]
    _fields_ += [(n, _S3) for n in ("q_s", "k_s", "v_s", "g_s", "beta_s", "reset_s", "o_s", "do_s")]
    _fields_ += [(n, _I) for n in ("B", "H", "T", "DK", "DV", "nv", "nc", "ti", "tv")] + [("scale", _D)]


class RmsParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("o", "gate", "weight", "y", "dy", "d_o", "d_gate", "d_weight")]
    _fields_ += [(n, _I) for n in ("rows", "d", "n_blocks", "to", "tg")] + [("eps", _D)]


STRUCT_SIZES = [ctypes.sizeof(LifParams), ctypes.sizeof(KdaParams), ctypes.sizeof(RmsParams)]


def _out(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _strides3(t: torch.Tensor):
    """(b, h, t) strides of a [B, H, T, ...] or [B, H, T] tensor, as a ctypes int64[3]."""
    return _S3(*t.stride()[:3])


def _grad_needed(tensors) -> bool:
    """Whether autograd will want a backward: decides what the forward saves (checkpoints,
    membranes). Not ctx.needs_input_grad, which stays True under torch.no_grad()."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _contig_f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float().contiguous()


def kda_tile_columns(dk: int) -> int:
    """Value columns per block for a head dim (csrc/kda.cuh, kda_bv)."""
    dkp = 32
    while dkp < dk:
        dkp *= 2
    return 32 // (dkp // KDA_ROWS) * (KDA_THREADS // 32)


# ------------------------------------------------------------------------------ LIF


class LifModulateFn(torch.autograd.Function):
    """Float32 contiguous in: drive, a [B, T, H, N]; beta_logit [B, T, H]; membrane [B, H, N]
    or None; reset uint8 [B, T] or None."""

    @staticmethod
    def forward(ctx, drive, a, beta_logit, membrane, reset, decay, threshold, slope, backend, need_grad):
        B, T, H, N = drive.shape
        dev = drive.device
        spikes, log_alpha = _out((B, T, H, N), torch.float32, dev), _out((B, T, H, N), torch.float32, dev)
        beta, m_out = _out((B, T, H), torch.float32, dev), _out((B, H, N), torch.float32, dev)
        v_save = _out((B, T, H, N), torch.float32, dev) if need_grad else None
        p = LifParams(drive=_ptr(drive), a=_ptr(a), beta_logit=_ptr(beta_logit), membrane=_ptr(membrane),
                      reset=_ptr(reset), spikes=_ptr(spikes), log_alpha=_ptr(log_alpha), beta=_ptr(beta),
                      v_save=_ptr(v_save), membrane_out=_ptr(m_out), B=B, T=T, H=H, N=N,
                      decay=decay, threshold=threshold, slope=slope)
        backend.run("lif_fwd", p, dev)
        ctx.save_for_backward(v_save, a, beta_logit, reset)
        ctx.consts = (decay, threshold, slope)
        ctx.has_membrane = membrane is not None
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return spikes, m_out, log_alpha, beta

    @staticmethod
    def backward(ctx, g_spikes, g_membrane, g_log_alpha, g_beta):
        v, a, beta_logit, reset = ctx.saved_tensors
        B, T, H, N = v.shape
        dev = v.device
        g_spikes, g_membrane, g_log_alpha, g_beta = map(_contig_f32, (g_spikes, g_membrane, g_log_alpha, g_beta))
        d_drive, d_a = _out((B, T, H, N), torch.float32, dev), _out((B, T, H, N), torch.float32, dev)
        d_bl = _out((B, T, H), torch.float32, dev)
        d_m = _out((B, H, N), torch.float32, dev) if ctx.has_membrane else None
        decay, threshold, slope = ctx.consts
        p = LifParams(v=_ptr(v), a=_ptr(a), beta_logit=_ptr(beta_logit), reset=_ptr(reset),
                      g_spikes=_ptr(g_spikes), g_log_alpha=_ptr(g_log_alpha), g_beta=_ptr(g_beta),
                      g_membrane=_ptr(g_membrane), d_drive=_ptr(d_drive), d_a=_ptr(d_a), d_beta_logit=_ptr(d_bl),
                      d_membrane=_ptr(d_m), B=B, T=T, H=H, N=N, decay=decay, threshold=threshold, slope=slope)
        ctx.backend.run("lif_bwd", p, dev)
        return d_drive, d_a, d_bl, d_m, None, None, None, None, None, None


def lif_modulate_fused(drive, a, beta_logit, decay, threshold, membrane=None, reset=None, slope=5.0, *, backend):
    """Same contract as reference.lif_modulate_reference; float32 arithmetic and state
    whatever the input dtypes (spikes come back in drive's dtype, membrane in float32)."""
    dtype = drive.dtype
    la_dtype = torch.promote_types(a.dtype, dtype)
    r = None if reset is None else reset.bool().to(torch.uint8).contiguous()
    ins = (drive.float().contiguous(), a.float().contiguous(), beta_logit.float().contiguous(), _contig_f32(membrane))
    spikes, m, log_alpha, beta = LifModulateFn.apply(
        *ins, r, float(decay), float(threshold), float(slope), backend, _grad_needed(ins))
    return spikes.to(dtype), m, log_alpha.to(la_dtype), beta


# ------------------------------------------------------------------------------ KDA


class KdaFn(torch.autograd.Function):
    """q, k, g [B, H, T, dk], v [B, H, T, dv], beta [B, H, T] (any strides, last dim
    contiguous; q/k/g/beta one dtype, v another, each float32 or bf16); s0 float32
    contiguous [B, H, dk, dv] or None; reset uint8 [B, H, T] view (any strides) or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, reset, scale, backend, need_grad):
        B, H, T, dk = q.shape
        dv = v.shape[-1]
        dev = q.device
        nv = -(-dv // kda_tile_columns(dk))
        nc = -(-T // KDA_CHUNK)
        o = _out((B, T, H, dv), v.dtype, dev).transpose(1, 2)  # [B, H, T, dv] view of a [B, T, H, dv] buffer
        s_final = _out((B, H, dk, dv), torch.float32, dev)
        ckpt = _out((B, H, nc, dk, dv), torch.float32, dev) if need_grad else None
        p = _kda_params(q, k, v, g, beta, reset, scale, nv, nc)
        p.s0, p.o, p.s_final, p.ckpt = _ptr(s0), _ptr(o), _ptr(s_final), _ptr(ckpt)
        p.o_s = _strides3(o)
        backend.run("kda_fwd", p, dev)
        ctx.save_for_backward(q, k, v, g, beta, reset, ckpt)
        ctx.scale, ctx.has_s0, ctx.backend, ctx.nv, ctx.nc = scale, s0 is not None, backend, nv, nc
        ctx.set_materialize_grads(False)
        return o, s_final

    @staticmethod
    def backward(ctx, d_o, d_sfinal):
        q, k, v, g, beta, reset, ckpt = ctx.saved_tensors
        B, H, T, dk = q.shape
        dv = v.shape[-1]
        dev = q.device
        nv, nc = ctx.nv, ctx.nc
        if d_o is not None:
            d_o = _lastdim_contiguous(d_o.to(v.dtype))
        d_sfinal = _contig_f32(d_sfinal)
        dq, dk_, dg = (_out((nv, B, H, T, dk), torch.float32, dev) for _ in range(3))
        dbeta = _out((nv, B, H, T), torch.float32, dev)
        dv_ = _out((B, H, T, dv), torch.float32, dev)
        ds0 = _out((B, H, dk, dv), torch.float32, dev) if ctx.has_s0 else None
        p = _kda_params(q, k, v, g, beta, reset, ctx.scale, nv, nc)
        p.ckpt, p.d_o, p.d_sfinal = _ptr(ckpt), _ptr(d_o), _ptr(d_sfinal)
        p.dq, p.dk, p.dg, p.dbeta, p.dv, p.ds0 = map(_ptr, (dq, dk_, dg, dbeta, dv_, ds0))
        if d_o is not None:
            p.do_s = _strides3(d_o)
        ctx.backend.run("kda_bwd", p, dev)

        def total(part, like):
            return (part[0] if nv == 1 else part.sum(0)).to(like.dtype)

        return (total(dq, q), total(dk_, k), dv_.to(v.dtype), total(dg, g), total(dbeta, beta), ds0,
                None, None, None, None)


def _kda_params(q, k, v, g, beta, reset, scale, nv, nc) -> KdaParams:
    B, H, T, dk = q.shape
    p = KdaParams(q=_ptr(q), k=_ptr(k), v=_ptr(v), g=_ptr(g), beta=_ptr(beta), reset=_ptr(reset),
                  B=B, H=H, T=T, DK=dk, DV=v.shape[-1], nv=nv, nc=nc,
                  ti=DTYPE_CODE[q.dtype], tv=DTYPE_CODE[v.dtype], scale=scale)
    p.q_s, p.k_s, p.v_s, p.g_s, p.beta_s = (_strides3(x) for x in (q, k, v, g, beta))
    if reset is not None:
        p.reset_s = _strides3(reset)
    return p


def _reset_bht(reset: Optional[torch.Tensor], B: int, H: int, T: int) -> Optional[torch.Tensor]:
    """[B, T] or [B, H, T] bool -> a [B, H, T] uint8 view (h stride 0 for [B, T])."""
    if reset is None:
        return None
    r = reset.to(torch.uint8)
    if r.dim() == 2:
        r = r[:, None, :]
    return r.expand(B, H, T)


def kda_fused(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None, *, backend):
    """Same contract as model.kda.kda_chunk / kda_recurrent (o in v's dtype, final state float32)."""
    B, H, T, dk = q.shape
    scale = dk ** -0.5 if scale is None else float(scale)
    v_dtype = v.dtype
    tv = v_dtype if v_dtype in DTYPE_CODE else torch.float32
    gates = (q, k, log_alpha, beta)
    ti = torch.bfloat16 if all(x.dtype == torch.bfloat16 for x in gates) and tv == torch.bfloat16 else torch.float32
    q, k, log_alpha = (_lastdim_contiguous(x.to(ti)) for x in (q, k, log_alpha))
    beta = beta.to(ti)
    v = _lastdim_contiguous(v.to(tv))
    s0 = _contig_f32(initial_state)
    ins = (q, k, v, log_alpha, beta, s0)
    o, s = KdaFn.apply(*ins, _reset_bht(reset, B, H, T), scale, backend, _grad_needed(ins))
    return o.to(v_dtype), s


def kda_step_fused(q, k, v, log_alpha, beta, state=None, scale=None, reset=None, *, backend):
    """Same contract as model.kda.kda_step: q, k, log_alpha [B, H, dk]; v [B, H, dv]; beta [B, H];
    reset [B] or [B, H]. The forward kernel with T = 1."""
    if reset is not None:
        reset = reset.reshape(q.shape[0], -1)[..., None]  # [B, 1, 1] or [B, H, 1]
    o, s = kda_fused(q[:, :, None], k[:, :, None], v[:, :, None], log_alpha[:, :, None], beta[:, :, None],
                     state, scale, reset, backend=backend)
    return o[:, :, 0], s


# ------------------------------------------------------------------------------ gated RMSNorm


class GatedRmsNormFn(torch.autograd.Function):
    """o, gate [rows, d] contiguous (float32 or bf16 each); weight float32 [d]."""

    @staticmethod
    def forward(ctx, o, gate, weight, eps, backend):
        rows, d = o.shape
        dev = o.device
        y = _out((rows, d), torch.float32, dev)
        n_blocks = max(1, min(-(-rows // RMS_WARPS), 1024))
        p = RmsParams(o=_ptr(o), gate=_ptr(gate), weight=_ptr(weight), y=_ptr(y), rows=rows, d=d,
                      n_blocks=n_blocks, to=DTYPE_CODE[o.dtype], tg=DTYPE_CODE[gate.dtype], eps=eps)
        backend.run("rms_fwd", p, dev)
        ctx.save_for_backward(o, gate, weight)
        ctx.eps, ctx.backend, ctx.n_blocks = eps, backend, n_blocks
        return y

    @staticmethod
    def backward(ctx, dy):
        o, gate, weight = ctx.saved_tensors
        rows, d = o.shape
        dev = o.device
        dy = dy.float().contiguous()
        d_o, d_gate = _out((rows, d), torch.float32, dev), _out((rows, d), torch.float32, dev)
        d_w = _out((ctx.n_blocks, d), torch.float32, dev)
        p = RmsParams(o=_ptr(o), gate=_ptr(gate), weight=_ptr(weight), dy=_ptr(dy), d_o=_ptr(d_o),
                      d_gate=_ptr(d_gate), d_weight=_ptr(d_w), rows=rows, d=d, n_blocks=ctx.n_blocks,
                      to=DTYPE_CODE[o.dtype], tg=DTYPE_CODE[gate.dtype], eps=ctx.eps)
        ctx.backend.run("rms_bwd", p, dev)
        return d_o.to(o.dtype), d_gate.to(gate.dtype), d_w.sum(0), None, None


def gated_rmsnorm_fused(o, gate, weight, eps, *, backend):
    """Same contract as reference.gated_rmsnorm_reference (float32 out)."""
    shape, d = o.shape, o.shape[-1]

    def rows(x):
        x = x if x.dtype in DTYPE_CODE else x.float()
        return x.reshape(-1, d).contiguous()

    w = weight.float().contiguous()
    y = GatedRmsNormFn.apply(rows(o), rows(gate), w, float(eps), backend)
    return y.view(shape)


__all__ = ["POISON", "LifModulateFn", "KdaFn", "GatedRmsNormFn", "lif_modulate_fused", "kda_fused",
           "kda_step_fused", "gated_rmsnorm_fused", "kda_tile_columns", "STRUCT_SIZES"]
