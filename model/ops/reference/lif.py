"""Leaky integrate-and-fire (LIF) neurons: a drive in, binary spikes out.

Per neuron, per token t (lam = membrane decay, theta = threshold):

    v_t = lam * m_{t-1} + drive_t        membrane before the spike decision
    s_t = H(v_t - theta)                 spike (Heaviside)
    m_t = v_t - theta * s_t              reset by subtraction (keeps the surplus charge)

The Heaviside step has no useful derivative, so the backward pass uses a surrogate:
the fast-sigmoid derivative  ds/dv ~= 1 / (1 + slope * |v - theta|)^2  (SuperSpike),
nonzero everywhere, so a neuron that has gone quiet still receives gradient and can
come back. As is common for SNN training, the reset path (theta * s_t) is treated as a
constant in the backward pass, which makes the membrane's gradient a plain leaky
(linear) reverse scan.

A document reset zeroes the membrane before that token: v_t = drive_t.

`lif_scan_reference` is the specification, written with autograd, one token at a time;
tests compare the others to it. `lif_scan_sequential` is the same loop with a hand-written
backward (a second loop). `lif_scan` keeps the loop over tokens in its forward (the spike
decision is not linear in the drive; iterating a linear scan to a fixed point of the spike
pattern is exact but needs as many whole-sequence rounds as the slowest neuron has
mis-placed spikes, over a hundred at T = 256), and has none in its backward: the
membrane's gradient is a *linear* leaky reverse scan, a matmul with a lower-triangular
matrix of decay powers (`_leaky_scan`: inside chunks of 32 tokens, then across the chunk
ends the same way), run over the flipped sequence.

Training runs these only under `model.kernels = "reference"`: the op `lif_modulate`
(model/ops/dispatch.py) runs the scan with its modulation as one compiled pass each way on
CPU (model/ops/cpu) and as a Triton kernel on CUDA (model/ops/triton/lif.py).

Summed in a different order than the loop, the backward agrees with the reference's to
float rounding; the forward is the reference's arithmetic, so spikes are identical.
"""
from __future__ import annotations

from typing import Optional

import torch


def surrogate_grad(x: torch.Tensor, slope: float) -> torch.Tensor:
    """Fast-sigmoid derivative at x = v - theta (1 at the threshold, decaying as 1/x^2)."""
    return 1.0 / (1.0 + slope * x.abs()) ** 2


class SpikeFn(torch.autograd.Function):
    """Heaviside forward (x >= 0), fast-sigmoid surrogate backward. x = v - theta."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slope = slope
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, ctx.slope), None


def _prepare(drive, membrane, reset):
    B, T = drive.shape[:2]
    m = drive.new_zeros(drive.shape[:1] + drive.shape[2:]) if membrane is None else membrane.to(drive.dtype)
    keep = None
    if reset is not None:  # [B, T] -> [B, T, 1, ..., 1], 0.0 where a new document starts
        keep = (~reset.bool()).to(drive.dtype).view(B, T, *([1] * (drive.dim() - 2)))
    return m, keep


def lif_scan_reference(
    drive: torch.Tensor,
    decay: float,
    threshold: float,
    membrane: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    slope: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification, with autograd. drive [B, T, *N]; membrane [B, *N] or None;
    reset [B, T] bool or None. Returns (spikes [B, T, *N], final membrane [B, *N])."""
    m, keep = _prepare(drive, membrane, reset)
    spikes = []
    for t, drive_t in enumerate(drive.unbind(1)):
        if keep is not None:
            m = m * keep[:, t]
        v = decay * m + drive_t
        s = SpikeFn.apply(v - threshold, slope)
        m = v - threshold * s.detach()
        spikes.append(s)
    return torch.stack(spikes, dim=1), m


def _lif_forward(drive, membrane, keep, decay, threshold):
    """The membrane loop of both scans' forward: (v_all, spikes, final membrane), v_all the
    pre-reset potentials [B, T, ...] the backward needs. `decay * m` is rounded before the
    add, as in the reference (and in model/ops/cpu/csrc/lif_scan.c)."""
    v_all = torch.empty_like(drive)
    m = membrane
    for t, (drive_t, v) in enumerate(zip(drive.unbind(1), v_all.unbind(1))):
        if keep is not None:
            m = m * keep[:, t]
        torch.add(drive_t, m * decay, out=v)  # v_t, written straight into v_all
        m = torch.where(v >= threshold, v - threshold, v)
    return v_all, (v_all >= threshold).to(drive.dtype), m


class _LIFScanSequential(torch.autograd.Function):
    """lif_scan_sequential: the loop over tokens with a manual backward (module docstring)."""

    @staticmethod
    def forward(ctx, drive, membrane, keep, decay, threshold, slope):
        v_all, spikes, m = _lif_forward(drive, membrane, keep, decay, threshold)
        ctx.save_for_backward(v_all, keep)
        ctx.decay, ctx.threshold, ctx.slope = decay, threshold, slope
        return spikes, m

    @staticmethod
    def backward(ctx, grad_spikes, grad_m):
        v_all, keep = ctx.saved_tensors
        decay = ctx.decay
        T = v_all.shape[1]
        # dL/dv_t = surrogate(v_t) dL/ds_t + dL/dm_t, and dL/dm_{t-1} = decay * keep_t * dL/dv_t
        direct = surrogate_grad(v_all - ctx.threshold, ctx.slope)
        direct = direct * grad_spikes if grad_spikes is not None else torch.zeros_like(v_all)
        grad_drive = torch.empty_like(v_all)  # dL/dv_t = dL/d drive_t
        gm = grad_m if grad_m is not None else torch.zeros_like(v_all[:, 0])
        for t, direct_t, gv in zip(range(T - 1, -1, -1), direct.unbind(1)[::-1], grad_drive.unbind(1)[::-1]):
            torch.add(direct_t, gm, out=gv)
            gm = gv * (decay if keep is None else decay * keep[:, t])
        return grad_drive, gm, None, None, None, None


def lif_scan_sequential(
    drive: torch.Tensor,
    decay: float,
    threshold: float,
    membrane: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    slope: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As lif_scan, with a Python loop over tokens (forward and backward)."""
    m, keep = _prepare(drive, membrane, reset)
    return _LIFScanSequential.apply(drive, m, keep, float(decay), float(threshold), float(slope))


_SCAN_CHUNK = 32


def _powers(decay: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """[n, n] lower-triangular decay**(t - j) for t >= j, 0 above the diagonal."""
    t = torch.arange(n, device=like.device)
    e = (t[:, None] - t[None, :]).to(like.dtype)
    return torch.where(e >= 0, torch.full_like(e, decay) ** e.clamp(min=0), 0.0)


def _leaky_scan(x: torch.Tensor, decay: float, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """y_t = decay * keep_t * y_{t-1} + x_t with y_{-1} = 0, along dim 1, without a loop over t.

    x: [B, T, N]; keep: [B, T] in {0, 1} (0 cuts the sum before token t) or None. Chunks of
    L tokens: inside a chunk a [L, L] matrix of decay powers (zeroed across a cut), then the
    chunk ends are scanned the same way with decay**L, and each token adds its chunk's
    incoming value times decay**(t+1)."""
    B, T, N = x.shape
    L = min(_SCAN_CHUNK, T)
    pad = (-T) % L
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        if keep is not None:
            keep = torch.nn.functional.pad(keep, (0, pad), value=1.0)
    nC = x.shape[1] // L
    xc = x.view(B, nC, L, N)
    D = _powers(decay, L, x)  # [L, L]
    if keep is None:
        local = D @ xc  # [B, nC, L, N]
    else:
        seg = (1.0 - keep).cumsum(1).view(B, nC, L)  # cuts so far: same segment <=> no cut in (j, t]
        local = (D * (seg[..., :, None] == seg[..., None, :])) @ xc
    if nC == 1:
        return local.reshape(B, -1, N)[:, :T]
    ends = local[:, :, -1]  # [B, nC, N]: each chunk's own sum at its last token
    Dc = _powers(decay ** L, nC, x)  # [nC, nC]
    into = torch.arange(1, L + 1, device=x.device, dtype=x.dtype)
    into = torch.full_like(into, decay) ** into  # [L]: decay**(t+1), how the incoming value reaches t
    if keep is None:
        carry = Dc @ ends  # [B, nC, N]: y at the end of chunk c
        reach = into[:, None].expand(L, 1)
    else:
        kc = keep.view(B, nC, L)
        open_ = (kc > 0).all(-1)  # [B, nC]: no cut inside chunk c
        cseg = (~open_).long().cumsum(1)
        # chunk c' reaches the end of chunk c > c' only if no chunk in (c', c] has a cut
        carry = (Dc * (cseg[:, :, None] == cseg[:, None, :])) @ ends
        reach = (into * (kc.cumprod(-1) > 0))[..., None]  # [B, nC, L, 1]: 0 from a cut on
    incoming = torch.nn.functional.pad(carry[:, :-1], (0, 0, 1, 0))  # y entering chunk c
    y = local + reach * incoming[:, :, None]
    return y.reshape(B, -1, N)[:, :T]


class _LIFScan(torch.autograd.Function):
    """lif_scan: the spike loop forward, a parallel reverse scan backward (module docstring)."""

    @staticmethod
    def forward(ctx, drive, membrane, keep, decay, threshold, slope):
        v_all, spikes, m = _lif_forward(drive, membrane, keep, decay, threshold)
        ctx.save_for_backward(v_all.view(*v_all.shape[:2], v_all[0, 0].numel()), keep)
        ctx.decay, ctx.threshold, ctx.slope, ctx.shape = decay, threshold, slope, drive.shape
        return spikes, m

    @staticmethod
    def backward(ctx, grad_spikes, grad_m):
        v, keep = ctx.saved_tensors
        decay = ctx.decay
        B, T = v.shape[:2]
        # dL/dv_t = surrogate(v_t) dL/ds_t + decay keep_{t+1} dL/dv_{t+1}, plus dL/dm_end at t = T-1:
        # a reverse leaky scan, run as a forward one over the flipped sequence
        direct = surrogate_grad(v - ctx.threshold, ctx.slope)
        direct = direct * grad_spikes.reshape(B, T, -1) if grad_spikes is not None else torch.zeros_like(v)
        x = direct.flip(1)
        if grad_m is not None:  # flip made a copy
            x[:, 0] += grad_m.reshape(B, -1)
        k = None
        if keep is not None:
            kk = keep.reshape(B, T)
            k = torch.cat([torch.ones_like(kk[:, :1]), kk[:, 1:].flip(1)], 1)
        gv = _leaky_scan(x, decay, k).flip(1)  # dL/dv_t = dL/d drive_t
        g0 = gv[:, 0] * (decay if keep is None else decay * keep.reshape(B, T)[:, :1])
        return gv.view(ctx.shape), g0.view(ctx.shape[:1] + ctx.shape[2:]), None, None, None, None


def lif_scan(
    drive: torch.Tensor,
    decay: float,
    threshold: float,
    membrane: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    slope: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run LIF neurons over time.

    drive: [B, T, *N] input current; membrane: [B, *N] initial membrane (None = zeros);
    reset: [B, T] bool, True where a document starts (membrane zeroed before that token).
    Returns (spikes [B, T, *N] in {0, 1} with surrogate gradient, final membrane [B, *N]).
    """
    m, keep = _prepare(drive, membrane, reset)
    return _LIFScan.apply(drive, m, keep, float(decay), float(threshold), float(slope))
