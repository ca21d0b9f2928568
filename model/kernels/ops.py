"""The fused ops, registered as `torch.library` custom ops over a kernel backend.

Each kernel is an op in the `spike_kernels` namespace taking tensors (`lif_fwd`,
`lif_bwd`, `kda_fwd`, `kda_bwd`, `rms_fwd`, `rms_bwd`), with a fake implementation (so
`torch.compile` traces through them) and autograd registered (the forward ops'
backward calls the backward ops). Every op checks shapes, dtypes, devices and layouts at
its boundary and raises a ValueError naming the argument, before any pointer reaches a
kernel. The `*_fused` functions below are the public entry points (same contracts as
the references): they cast and lay out their inputs and call the ops.

An op runs on the backend of its tensors' device (`backend_for`): the CUDA build
(nvcc extension `build.CudaBackend` or NVRTC module `nvrtc.NvrtcBackend`) on GPU
tensors, the host emulation of the same kernel source (`emu.EmuBackend`) on CPU tensors,
which is how the kernels (and the ops, with `torch.library.opcheck`) are tested without
a GPU. A backend runs a named launcher on a parameter struct that this module fills.

Every output is allocated here; with `SPIKE_KERNELS_POISON=1` in the environment (or
`ops.POISON = True`) outputs are filled with NaN first, so an element a kernel fails to
write shows up as NaN in the tests.

The ctypes structs mirror `sk::LifParams`, `sk::KdaParams` and `sk::RmsParams` in
csrc/*.cuh field for field (only 8-byte fields: pointers, int64, double); each backend
checks their sizes against the compiled ones before its first launch.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .abi import (  # noqa: F401
    _S3,
    DTYPE_CODE,
    KDA_CHUNK,
    KDA_MAX_DK,
    KDA_ROWS,
    KDA_THREADS,
    LIF_MAX_CHANNELS,
    RMS_WARPS,
    STRUCT_SIZES,
    KdaParams,
    LifParams,
    RmsParams,
)

POISON = os.environ.get("SPIKE_KERNELS_POISON", "") not in ("", "0")



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


# ------------------------------------------------------------------------------ backends and checks


def backend_for(device: torch.device):
    """The kernel backend for tensors on `device`: the CUDA build (nvcc or NVRTC, build.py)
    on a GPU, the host emulation of the same source (emu.py) on the CPU."""
    if device.type == "cuda":
        from . import build

        be = build.backend()
        if be is None:
            raise RuntimeError(f"model.kernels: no fused CUDA build ({build.reason()})")
        return be
    if device.type == "cpu":
        from .emu import EmuBackend

        return EmuBackend.load()
    raise RuntimeError(f"model.kernels: no kernel backend for {device.type} tensors")


def _fail(op: str, what: str):
    raise ValueError(f"model.kernels.{op}: {what}")


def _want(op: str, name: str, t: torch.Tensor, shape=None, dtypes=None, device=None, contiguous=False,
          lastdim=False) -> None:
    """Raise a clear ValueError unless t has that shape / a dtype in dtypes / that device / the layout."""
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(op, f"{name} has dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
    if device is not None and t.device != device:
        _fail(op, f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    if contiguous and not t.is_contiguous():
        _fail(op, f"{name} must be contiguous")
    if lastdim and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(op, f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")


F32, F32_BF16, U8 = (torch.float32,), (torch.float32, torch.bfloat16), (torch.uint8,)


def _empty(device) -> torch.Tensor:
    """The stand-in for an absent tensor output (custom ops return tensors, not None)."""
    return torch.empty(0, dtype=torch.float32, device=device)


def _opt(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None or t.numel() == 0 else t


# ------------------------------------------------------------------------------ LIF


def _check_lif(op, drive, a, beta_logit, membrane, reset):
    if drive.dim() != 4:
        _fail(op, f"drive must be [B, T, H, N], got shape {list(drive.shape)}")
    B, T, H, N = drive.shape
    if not 1 <= N <= LIF_MAX_CHANNELS:
        _fail(op, f"channels per head must be in [1, {LIF_MAX_CHANNELS}], got {N}")
    dev = drive.device
    _want(op, "drive", drive, dtypes=F32, contiguous=True)
    _want(op, "a", a, (B, T, H, N), F32, dev, True)
    _want(op, "beta_logit", beta_logit, (B, T, H), F32, dev, True)
    if membrane is not None:
        _want(op, "membrane", membrane, (B, H, N), F32, dev, True)
    if reset is not None:
        _want(op, "reset", reset, (B, T), U8, dev, True)


@torch.library.custom_op("spike_kernels::lif_fwd", mutates_args=())
def lif_fwd(drive: torch.Tensor, a: torch.Tensor, beta_logit: torch.Tensor, membrane: Optional[torch.Tensor],
            reset: Optional[torch.Tensor], decay: float, threshold: float, slope: float,
            save_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LIF scan + modulation: (spikes, final membrane, log_alpha, beta, v_save or empty)."""
    _check_lif("lif_fwd", drive, a, beta_logit, membrane, reset)
    B, T, H, N = drive.shape
    dev = drive.device
    spikes, log_alpha = _out((B, T, H, N), torch.float32, dev), _out((B, T, H, N), torch.float32, dev)
    beta, m_out = _out((B, T, H), torch.float32, dev), _out((B, H, N), torch.float32, dev)
    v_save = _out((B, T, H, N), torch.float32, dev) if save_v else None
    p = LifParams(drive=_ptr(drive), a=_ptr(a), beta_logit=_ptr(beta_logit), membrane=_ptr(membrane),
                  reset=_ptr(reset), spikes=_ptr(spikes), log_alpha=_ptr(log_alpha), beta=_ptr(beta),
                  v_save=_ptr(v_save), membrane_out=_ptr(m_out), B=B, T=T, H=H, N=N,
                  decay=decay, threshold=threshold, slope=slope)
    backend_for(dev).run("lif_fwd", p, dev)
    return spikes, m_out, log_alpha, beta, v_save if v_save is not None else _empty(dev)


@lif_fwd.register_fake
def _(drive, a, beta_logit, membrane, reset, decay, threshold, slope, save_v):
    _check_lif("lif_fwd", drive, a, beta_logit, membrane, reset)
    B, T, H, N = drive.shape
    e = drive.new_empty
    return e((B, T, H, N)), e((B, H, N)), e((B, T, H, N)), e((B, T, H)), e((B, T, H, N)) if save_v else e((0,))


@torch.library.custom_op("spike_kernels::lif_bwd", mutates_args=())
def lif_bwd(v: torch.Tensor, a: torch.Tensor, beta_logit: torch.Tensor, reset: Optional[torch.Tensor],
            g_spikes: Optional[torch.Tensor], g_membrane: Optional[torch.Tensor], g_log_alpha: Optional[torch.Tensor],
            g_beta: Optional[torch.Tensor], decay: float, threshold: float, slope: float,
            has_membrane: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_drive, d_a, d_beta_logit, d_membrane or empty) given the forward's v_save."""
    _check_lif("lif_bwd", v, a, beta_logit, None, reset)
    B, T, H, N = v.shape
    dev = v.device
    for name, g, shape in (("g_spikes", g_spikes, (B, T, H, N)), ("g_membrane", g_membrane, (B, H, N)),
                           ("g_log_alpha", g_log_alpha, (B, T, H, N)), ("g_beta", g_beta, (B, T, H))):
        if g is not None:
            _want("lif_bwd", name, g, shape, F32, dev, True)
    d_drive, d_a = _out((B, T, H, N), torch.float32, dev), _out((B, T, H, N), torch.float32, dev)
    d_bl = _out((B, T, H), torch.float32, dev)
    d_m = _out((B, H, N), torch.float32, dev) if has_membrane else None
    p = LifParams(v=_ptr(v), a=_ptr(a), beta_logit=_ptr(beta_logit), reset=_ptr(reset),
                  g_spikes=_ptr(g_spikes), g_log_alpha=_ptr(g_log_alpha), g_beta=_ptr(g_beta),
                  g_membrane=_ptr(g_membrane), d_drive=_ptr(d_drive), d_a=_ptr(d_a), d_beta_logit=_ptr(d_bl),
                  d_membrane=_ptr(d_m), B=B, T=T, H=H, N=N, decay=decay, threshold=threshold, slope=slope)
    backend_for(dev).run("lif_bwd", p, dev)
    return d_drive, d_a, d_bl, d_m if d_m is not None else _empty(dev)


@lif_bwd.register_fake
def _(v, a, beta_logit, reset, g_spikes, g_membrane, g_log_alpha, g_beta, decay, threshold, slope, has_membrane):
    _check_lif("lif_bwd", v, a, beta_logit, None, reset)
    B, T, H, N = v.shape
    e = v.new_empty
    return e((B, T, H, N)), e((B, T, H, N)), e((B, T, H)), e((B, H, N)) if has_membrane else e((0,))


def _lif_setup(ctx, inputs, output):
    drive, a, beta_logit, membrane, reset, decay, threshold, slope, save_v = inputs
    ctx.mark_non_differentiable(output[4])
    ctx.save_for_backward(output[4], a, beta_logit, reset)
    ctx.consts = (decay, threshold, slope)
    ctx.has_membrane = membrane is not None
    ctx.set_materialize_grads(False)


def _lif_backward(ctx, g_spikes, g_membrane, g_log_alpha, g_beta, _g_v):
    v, a, beta_logit, reset = ctx.saved_tensors
    if v.numel() == 0 and a.numel() != 0:
        raise RuntimeError("model.kernels.lif_fwd: backward without save_v=True in the forward")
    g_spikes, g_membrane, g_log_alpha, g_beta = map(_contig_f32, (g_spikes, g_membrane, g_log_alpha, g_beta))
    d_drive, d_a, d_bl, d_m = lif_bwd(v, a, beta_logit, reset, g_spikes, g_membrane, g_log_alpha, g_beta,
                                      *ctx.consts, ctx.has_membrane)
    return d_drive, d_a, d_bl, (d_m if ctx.has_membrane else None), None, None, None, None, None


lif_fwd.register_autograd(_lif_backward, setup_context=_lif_setup)


def lif_modulate_fused(drive, a, beta_logit, decay, threshold, membrane=None, reset=None, slope=5.0):
    """Same contract as reference.lif_modulate_reference; float32 arithmetic and state
    whatever the input dtypes (spikes come back in drive's dtype, membrane in float32)."""
    dtype = drive.dtype
    la_dtype = torch.promote_types(a.dtype, dtype)
    r = None if reset is None else reset.bool().to(torch.uint8).contiguous()
    ins = (drive.float().contiguous(), a.float().contiguous(), beta_logit.float().contiguous(), _contig_f32(membrane))
    spikes, m, log_alpha, beta, _ = lif_fwd(*ins, r, float(decay), float(threshold), float(slope), _grad_needed(ins))
    return spikes.to(dtype), m, log_alpha.to(la_dtype), beta


# ------------------------------------------------------------------------------ KDA


def _check_kda(op, q, k, v, g, beta, s0, reset):
    if q.dim() != 4:
        _fail(op, f"q must be [B, H, T, dk], got shape {list(q.shape)}")
    B, H, T, dk = q.shape
    if not 1 <= dk <= KDA_MAX_DK:
        _fail(op, f"head dim dk must be in [1, {KDA_MAX_DK}], got {dk}")
    dev, ti = q.device, q.dtype
    _want(op, "q", q, dtypes=F32_BF16, lastdim=True)
    _want(op, "k", k, (B, H, T, dk), (ti,), dev, lastdim=True)
    _want(op, "log_alpha", g, (B, H, T, dk), (ti,), dev, lastdim=True)
    _want(op, "beta", beta, (B, H, T), (ti,), dev)
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, H, T):
        _fail(op, f"v has shape {list(v.shape)}, expected [{B}, {H}, {T}, dv]")
    _want(op, "v", v, dtypes=F32_BF16, device=dev, lastdim=True)
    if ti == torch.bfloat16 and v.dtype == torch.float32:
        _fail(op, "bf16 q/k/log_alpha/beta with float32 v is not a kernel variant (cast v to bf16 or the gates to float32)")
    if s0 is not None:
        _want(op, "initial_state", s0, (B, H, dk, v.shape[-1]), F32, dev, True)
    if reset is not None:
        _want(op, "reset", reset, (B, H, T), U8, dev)


def _kda_sizes(q, v):
    B, H, T, dk = q.shape
    return -(-v.shape[-1] // kda_tile_columns(dk)), (T + KDA_CHUNK - 1) // KDA_CHUNK


@torch.library.custom_op("spike_kernels::kda_fwd", mutates_args=())
def kda_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            s0: Optional[torch.Tensor], reset: Optional[torch.Tensor], scale: float,
            save_ckpt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KDA forward: (o [B, H, T, dv] view of a [B, T, H, dv] buffer, final state, chunk checkpoints or empty)."""
    _check_kda("kda_fwd", q, k, v, g, beta, s0, reset)
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    dev = q.device
    nv, nc = _kda_sizes(q, v)
    o = _out((B, T, H, dv), v.dtype, dev).transpose(1, 2)  # [B, H, T, dv] view of a [B, T, H, dv] buffer
    s_final = _out((B, H, dk, dv), torch.float32, dev)
    ckpt = _out((B, H, nc, dk, dv), torch.float32, dev) if save_ckpt else None
    p = _kda_params(q, k, v, g, beta, reset, scale, nv, nc)
    p.s0, p.o, p.s_final, p.ckpt = _ptr(s0), _ptr(o), _ptr(s_final), _ptr(ckpt)
    p.o_s = _strides3(o)
    backend_for(dev).run("kda_fwd", p, dev)
    return o, s_final, ckpt if ckpt is not None else _empty(dev)


@kda_fwd.register_fake
def _(q, k, v, g, beta, s0, reset, scale, save_ckpt):
    _check_kda("kda_fwd", q, k, v, g, beta, s0, reset)
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    nc = (T + KDA_CHUNK - 1) // KDA_CHUNK
    o = v.new_empty((B, T, H, dv)).transpose(1, 2)
    f = q.new_empty((0,), dtype=torch.float32).new_empty
    return o, f((B, H, dk, dv)), f((B, H, nc, dk, dv)) if save_ckpt else f((0,))


def _check_kda_bwd(q, v, ckpt, d_o, d_sfinal):
    B, H, T, dk = q.shape
    dv, dev = v.shape[-1], q.device
    _want("kda_bwd", "ckpt", ckpt, (B, H, (T + KDA_CHUNK - 1) // KDA_CHUNK, dk, dv), F32, dev, True)
    if d_o is not None:
        _want("kda_bwd", "d_o", d_o, (B, H, T, dv), (v.dtype,), dev, lastdim=True)
    if d_sfinal is not None:
        _want("kda_bwd", "d_sfinal", d_sfinal, (B, H, dk, dv), F32, dev, True)


@torch.library.custom_op("spike_kernels::kda_bwd", mutates_args=())
def kda_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            reset: Optional[torch.Tensor], ckpt: torch.Tensor, d_o: Optional[torch.Tensor],
            d_sfinal: Optional[torch.Tensor], scale: float,
            has_s0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KDA backward from the forward's checkpoints: float32 (dq, dk, dv, dlog_alpha, dbeta, ds0 or empty)."""
    _check_kda("kda_bwd", q, k, v, g, beta, None, reset)
    _check_kda_bwd(q, v, ckpt, d_o, d_sfinal)
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    dev = q.device
    nv, nc = _kda_sizes(q, v)
    dq, dk_, dg = (_out((nv, B, H, T, dk), torch.float32, dev) for _ in range(3))
    dbeta = _out((nv, B, H, T), torch.float32, dev)
    dv_ = _out((B, H, T, dv), torch.float32, dev)
    ds0 = _out((B, H, dk, dv), torch.float32, dev) if has_s0 else None
    p = _kda_params(q, k, v, g, beta, reset, scale, nv, nc)
    p.ckpt, p.d_o, p.d_sfinal = _ptr(ckpt), _ptr(d_o), _ptr(d_sfinal)
    p.dq, p.dk, p.dg, p.dbeta, p.dv, p.ds0 = map(_ptr, (dq, dk_, dg, dbeta, dv_, ds0))
    if d_o is not None:
        p.do_s = _strides3(d_o)
    backend_for(dev).run("kda_bwd", p, dev)

    def total(part):
        return part[0] if nv == 1 else part.sum(0)

    return total(dq), total(dk_), dv_, total(dg), total(dbeta), ds0 if ds0 is not None else _empty(dev)


@kda_bwd.register_fake
def _(q, k, v, g, beta, reset, ckpt, d_o, d_sfinal, scale, has_s0):
    _check_kda("kda_bwd", q, k, v, g, beta, None, reset)
    _check_kda_bwd(q, v, ckpt, d_o, d_sfinal)
    B, H, T, dk = q.shape
    f = ckpt.new_empty
    return (f((B, H, T, dk)), f((B, H, T, dk)), f(tuple(v.shape)), f((B, H, T, dk)), f((B, H, T)),
            f((B, H, dk, v.shape[-1])) if has_s0 else f((0,)))


def _kda_setup(ctx, inputs, output):
    q, k, v, g, beta, s0, reset, scale, save_ckpt = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(q, k, v, g, beta, reset, output[2])
    ctx.scale, ctx.has_s0 = scale, s0 is not None
    ctx.set_materialize_grads(False)


def _kda_backward(ctx, d_o, d_sfinal, _d_ckpt):
    q, k, v, g, beta, reset, ckpt = ctx.saved_tensors
    if ckpt.numel() == 0:
        raise RuntimeError("model.kernels.kda_fwd: backward without save_ckpt=True in the forward")
    if d_o is not None:
        d_o = _lastdim_contiguous(d_o.to(v.dtype))
    dq, dk, dv, dg, dbeta, ds0 = kda_bwd(q, k, v, g, beta, reset, ckpt, d_o, _contig_f32(d_sfinal), ctx.scale,
                                         ctx.has_s0)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype),
            ds0 if ctx.has_s0 else None, None, None, None)


kda_fwd.register_autograd(_kda_backward, setup_context=_kda_setup)


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


def kda_fused(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None):
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
    o, s, _ = kda_fwd(*ins, _reset_bht(reset, B, H, T), scale, _grad_needed(ins))
    return o.to(v_dtype), s


def kda_step_fused(q, k, v, log_alpha, beta, state=None, scale=None, reset=None):
    """Same contract as model.kda.kda_step: q, k, log_alpha [B, H, dk]; v [B, H, dv]; beta [B, H];
    reset [B] or [B, H]. The forward kernel with T = 1."""
    if reset is not None:
        reset = reset.reshape(q.shape[0], -1)[..., None]  # [B, 1, 1] or [B, H, 1]
    o, s = kda_fused(q[:, :, None], k[:, :, None], v[:, :, None], log_alpha[:, :, None], beta[:, :, None],
                     state, scale, reset)
    return o[:, :, 0], s


# ------------------------------------------------------------------------------ gated RMSNorm


def _check_rms(op, o, gate, weight):
    if o.dim() != 2:
        _fail(op, f"o must be [rows, d], got shape {list(o.shape)}")
    rows, d = o.shape
    if d < 1:
        _fail(op, "empty last dim")
    _want(op, "o", o, dtypes=F32_BF16, contiguous=True)
    _want(op, "gate", gate, (rows, d), F32_BF16, o.device, True)
    _want(op, "weight", weight, (d,), F32, o.device, True)


def _rms_blocks(rows: int) -> int:
    return max(1, min(-(-rows // RMS_WARPS), 1024))


@torch.library.custom_op("spike_kernels::rms_fwd", mutates_args=())
def rms_fwd(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(o) * weight * silu(gate), float32 [rows, d]."""
    _check_rms("rms_fwd", o, gate, weight)
    rows, d = o.shape
    dev = o.device
    y = _out((rows, d), torch.float32, dev)
    p = RmsParams(o=_ptr(o), gate=_ptr(gate), weight=_ptr(weight), y=_ptr(y), rows=rows, d=d,
                  n_blocks=_rms_blocks(rows), to=DTYPE_CODE[o.dtype], tg=DTYPE_CODE[gate.dtype], eps=eps)
    backend_for(dev).run("rms_fwd", p, dev)
    return y


@rms_fwd.register_fake
def _(o, gate, weight, eps):
    _check_rms("rms_fwd", o, gate, weight)
    return o.new_empty(o.shape, dtype=torch.float32)


@torch.library.custom_op("spike_kernels::rms_bwd", mutates_args=())
def rms_bwd(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (d_o, d_gate, d_weight)."""
    _check_rms("rms_bwd", o, gate, weight)
    rows, d = o.shape
    dev = o.device
    _want("rms_bwd", "dy", dy, (rows, d), F32, dev, True)
    n_blocks = _rms_blocks(rows)
    d_o, d_gate = _out((rows, d), torch.float32, dev), _out((rows, d), torch.float32, dev)
    d_w = _out((n_blocks, d), torch.float32, dev)
    p = RmsParams(o=_ptr(o), gate=_ptr(gate), weight=_ptr(weight), dy=_ptr(dy), d_o=_ptr(d_o),
                  d_gate=_ptr(d_gate), d_weight=_ptr(d_w), rows=rows, d=d, n_blocks=n_blocks,
                  to=DTYPE_CODE[o.dtype], tg=DTYPE_CODE[gate.dtype], eps=eps)
    backend_for(dev).run("rms_bwd", p, dev)
    return d_o, d_gate, d_w.sum(0)


@rms_bwd.register_fake
def _(o, gate, weight, dy, eps):
    _check_rms("rms_bwd", o, gate, weight)
    f = dy.new_empty
    return f(o.shape), f(o.shape), f(weight.shape)


def _rms_setup(ctx, inputs, output):
    o, gate, weight, eps = inputs
    ctx.save_for_backward(o, gate, weight)
    ctx.eps = eps


def _rms_backward(ctx, dy):
    o, gate, weight = ctx.saved_tensors
    d_o, d_gate, d_w = rms_bwd(o, gate, weight, dy.float().contiguous(), ctx.eps)
    return d_o.to(o.dtype), d_gate.to(gate.dtype), d_w, None


rms_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def gated_rmsnorm_fused(o, gate, weight, eps):
    """Same contract as reference.gated_rmsnorm_reference (float32 out)."""
    shape, d = o.shape, o.shape[-1]

    def rows(x):
        x = x if x.dtype in DTYPE_CODE else x.float()
        return x.reshape(-1, d).contiguous()

    y = rms_fwd(rows(o), rows(gate), weight.float().contiguous(), float(eps))
    return y.view(shape)


__all__ = ["POISON", "backend_for", "lif_fwd", "lif_bwd", "kda_fwd", "kda_bwd", "rms_fwd", "rms_bwd",
           "lif_modulate_fused", "kda_fused", "kda_step_fused", "gated_rmsnorm_fused", "kda_tile_columns",
           "STRUCT_SIZES"]
