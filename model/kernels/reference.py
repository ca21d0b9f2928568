"""The PyTorch references of the fused ops: the specification the kernels are tested
against, and what runs wherever the kernels cannot (CPU, no compiler, build failure,
`model.kernels = "reference"`).

- `lif_modulate_reference`: the LIF spike scan (model/lif.py) with the Spike-KDA
  modulation of model/spike_kda.py folded in:
  log_alpha = -a * spikes (a channel forgets only when it spikes) and
  beta = sigmoid(beta_logit) * mean over the head's channels of spikes.
- `kda_reference`: model/kda.py's chunked (`kda_chunk`) or sequential (`kda_recurrent`)
  form; `kda_step_reference` is `kda_step`.
- `gated_rmsnorm_reference`: RMSNorm(o) * weight * silu(gate), in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kda import kda_chunk, kda_recurrent, kda_step
from ..lif import lif_scan


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
    """model/kda.py: `kda_recurrent` for impl == "recurrent", else `kda_chunk`."""
    if impl == "recurrent":
        return kda_recurrent(q, k, v, log_alpha, beta, initial_state, scale, reset)
    return kda_chunk(q, k, v, log_alpha, beta, initial_state, scale, reset, chunk_size)


kda_step_reference = kda_step


def gated_rmsnorm_reference(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(o.float(), (o.shape[-1],), weight.float(), eps) * F.silu(gate.float())
