"""The PyTorch references of the Spike-KDA layer's fast ops: the specification the fast
forms (compiled C loops, Triton kernels) are tested and first-call checked against, and
what runs under `model.kernels = "reference"`.

- `lif_modulate_reference`: the LIF spike scan (lif.py) with the Spike-KDA
  modulation of model/spike_kda.py folded in:
  log_alpha = -a * spikes (a channel forgets only when it spikes) and
  beta = sigmoid(beta_logit) * mean over the head's channels of spikes.
- `kda_reference`: kda.py's chunked (`kda_chunk`) or sequential (`kda_recurrent`)
  form; `kda_step_reference` is `kda_step`.
- `gated_rmsnorm_reference`: RMSNorm(o) * weight * silu(gate), in float32.
- `short_conv_reference`: ShortConv's causal depthwise convolution, one lag at a time.
- `split_heads_reference`: Spike-KDA's split of the conv's output into head-major q, k, v
  with q and k L2-normalised.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .kda import kda_chunk, kda_recurrent, kda_step
from .lif import lif_scan


def lif_modulate_reference(
    drive: torch.Tensor,
    a: torch.Tensor,
    beta_logit: torch.Tensor,
    decay: float,
    threshold: float,
    membrane: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    slope: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """drive, a: [B, T, H, N]; beta_logit: [B, T, H]; membrane: [B, H, N] or None;
    reset: [B, T] bool or None. Returns (spikes [B, T, H, N], final membrane [B, H, N],
    log_alpha [B, T, H, N], beta [B, T, H])."""
    spikes, membrane = lif_scan(drive, decay, threshold, membrane, reset, slope)
    log_alpha = -a * spikes
    beta = torch.sigmoid(beta_logit.float()) * spikes.mean(-1)
    return spikes, membrane, log_alpha, beta


def kda_reference(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None, chunk_size: int = 64,
                  impl: str = "chunk"):
    """kda.py: `kda_recurrent` for impl == "recurrent", else `kda_chunk`."""
    if impl == "recurrent":
        return kda_recurrent(q, k, v, log_alpha, beta, initial_state, scale, reset)
    return kda_chunk(q, k, v, log_alpha, beta, initial_state, scale, reset, chunk_size)


kda_step_reference = kda_step


def gated_rmsnorm_reference(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(o.float(), (o.shape[-1],), weight.float(), eps) * F.silu(gate.float())


def short_conv_reference(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor,
                         reset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The specification of ShortConv's convolution (before SiLU), one lag at a time.

    x [B, T, D]; weight [D, K]; tail [B, K-1, D]; reset [B, T] bool. Returns [B, T, D]:
    y_t = sum_lag weight[:, K-1-lag] x_{t-lag}, a term dropped when a reset lies in (t-lag, t]."""
    B, T, D = x.shape
    K = weight.shape[1]
    xx = torch.cat([tail.to(x.dtype), x], dim=1)
    if reset is not None:
        seg = F.pad(reset.long().cumsum(1), (K - 1, 0))
    y = x * weight[:, K - 1]
    for lag in range(1, K):
        term = xx[:, K - 1 - lag: K - 1 - lag + T] * weight[:, K - 1 - lag]
        if reset is not None:
            term = term * (seg[:, K - 1 - lag: K - 1 - lag + T] == seg[:, K - 1:])[..., None]
        y = y + term
    return y


def depthwise_conv_reference(xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y [B, T, D] = sum_j weight[:, j] * xx[:, t + j] for xx [B, T+K-1, D], weight [D, K]:
    the op `short_conv` (ShortConv's convolution with its tail already prepended)."""
    D = xx.shape[-1]
    return F.conv1d(xx.transpose(1, 2), weight.to(xx.dtype)[:, None, :], groups=D).transpose(1, 2)


def split_heads_reference(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, 3 H D] -> q, k, v [B, H, T, D], q and k L2-normalised over D (computed in
    float32 when qkv is of lower precision)."""
    B, T, F3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, F3 // (3 * heads)).unbind(2)
    dt = torch.promote_types(qkv.dtype, torch.float32)
    q, k = F.normalize(q.to(dt), dim=-1), F.normalize(k.to(dt), dim=-1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
