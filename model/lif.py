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

`lif_scan` runs the scan with a hand-written backward (two cheap loops over time instead
of an autograd graph with several nodes per token); `lif_scan_reference` is the same
thing written with autograd, kept as the readable specification that tests compare to.
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


class _LIFScan(torch.autograd.Function):
    """lif_scan with a manual backward; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, drive, membrane, keep, decay, threshold, slope):
        v_all = torch.empty_like(drive)
        m = membrane
        for t, (drive_t, v) in enumerate(zip(drive.unbind(1), v_all.unbind(1))):
            if keep is not None:
                m = m * keep[:, t]
            torch.add(drive_t, m, alpha=decay, out=v)  # v_t, written straight into v_all
            m = torch.where(v >= threshold, v - threshold, v)
        spikes = (v_all >= threshold).to(drive.dtype)
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
