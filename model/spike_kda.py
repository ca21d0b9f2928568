"""The Spike-KDA mixer: Kimi Delta Attention whose writes and forgetting are driven by
leaky integrate-and-fire spikes.

    x ──qkv──> short causal conv + SiLU ──> q, k (L2-normalised), v
    x ──drive──> LIF neurons (one per head and key channel) ──> spikes s_t in {0,1}^{H x dk}
    x ──low-rank──> decay magnitude a_t > 0 per key channel
    log alpha_t = -a_t * (g + (1 - g) s_t)
                                      a channel forgets only when it spikes, above a floor
                                      g (cfg.alpha_spike_floor, default 0: no floor)
    beta_t      = sigmoid(w x_t) * (f + (1 - f) mean_d s_t[d])
                                      a head writes in proportion to its spikes, above a floor
                                      f (cfg.beta_spike_floor, default 0: no floor)
    o_t = KDA(q, k, v, alpha, beta) ──> gated RMSNorm (RMSNorm(o) * silu(gate(x))) ──> out_proj

With `spiking` off (cfg.spiking, an ablation) the same layer is plain KDA: log alpha_t = -a_t
and beta_t = sigmoid(w x_t), no LIF neurons and no drive projection.

Event-driven semantics: a head with no spikes at step t has beta_t = 0 (with no beta
floor), so it writes nothing; with no alpha floor alpha_t = 1 as well, so its fast-weight
state is left exactly as it was and the step can be skipped at inference. With
alpha_spike_floor 1 (the shipped presets: bench/quality.py found spike-gated forgetting
costs held-out loss, spike-gated writing does not) a silent head's memory still decays.
Either way it still reads (o_t = S^T q_t), so its memory keeps serving.

State per layer (batch first): {"S": [B, H, dk, dv] fast weights, "membrane": [B, H, dk]
LIF membranes, "conv": [B, conv_size - 1, 3 * H * dk] the last inputs of the q/k/v conv}.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import ModelConfig


class ShortConv(nn.Module):
    """Causal depthwise convolution over time followed by SiLU.

    x: [B, T, D]; tail: [B, K-1, D] the inputs before x (None = zeros); reset: [B, T] bool.
    Returns (y [B, T, D], new tail [B, K-1, D]). Inputs from before a document reset are
    treated as zeros for the positions after it, so the conv never mixes documents.

    One pass over the whole call (the op `short_conv`: model/ops/dispatch.py picks the
    compiled C loop on CPU, the Triton kernel on CUDA); the few positions whose window reaches back across a reset (at
    most K-1 per reset) then have the earlier document's terms taken out again, gathered
    by index, so resets cost nothing where there are none.
    """

    def __init__(self, dim: int, size: int, kernels: str = "auto"):
        super().__init__()
        self.size, self.kernels = size, kernels
        # like nn.Conv1d's default for a depthwise conv: U(-1/sqrt(K), 1/sqrt(K))
        self.weight = nn.Parameter(torch.empty(dim, size).uniform_(-size ** -0.5, size ** -0.5))

    def forward(self, x: torch.Tensor, tail: Optional[torch.Tensor] = None, reset: Optional[torch.Tensor] = None):
        B, T, D = x.shape
        K = self.size
        if tail is None:
            tail = x.new_zeros(B, K - 1, D)
        xx = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        # y_t = sum_j w[j] xx[t + j] (j = K-1 is x_t itself)
        y = ops.short_conv(xx, self.weight, mode=self.kernels)
        new_tail = xx[:, xx.shape[1] - (K - 1):]
        if reset is not None and K > 1:
            # segment id per input position; the tail belongs to segment 0
            seg = F.pad(reset.long().cumsum(1), (K - 1, 0))  # [B, K-1+T]
            window = seg.unfold(1, K, 1)  # [B, T, K]: the segments position t's window reads
            earlier = window != window[..., -1:]  # inputs from before the position's document
            rows = earlier.any(-1).nonzero(as_tuple=True)  # (b, t) of the positions affected
            if rows[0].numel():
                b, t = rows
                reach = xx[b[:, None], t[:, None] + torch.arange(K, device=x.device)]  # [n, K, D]
                cut = (reach * (self.weight.t() * earlier[rows][..., None])).sum(1)  # [n, D]
                y = y.index_put(rows, y[rows] - cut)
            # keep only inputs of the stream's current document
            new_tail = new_tail * (seg[:, seg.shape[1] - (K - 1):] == seg[:, -1:])[..., None]
        return F.silu(y), new_tail


class GatedRMSNorm(nn.Module):
    """RMSNorm(o) * weight * silu(gate) over the last dim, in float32. o, gate: [..., d] -> [..., d]."""

    def __init__(self, dim: int, eps: float = 1e-6, kernels: str = "auto"):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return ops.gated_rmsnorm(o, gate, self.weight, self.eps, mode=self.kernels)


class SpikeKDA(nn.Module):
    """Spike-gated KDA mixer. x: [B, T, d] -> ([B, T, d], new state, spikes [B, T, H, dk] or None
    when cfg.spiking is off)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, dk = cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim = H, dk
        self.chunk_size, self.impl, self.kernels = cfg.chunk_size, cfg.kda_impl, cfg.kernels
        self.lif_decay, self.lif_threshold, self.slope = cfg.lif_decay, cfg.lif_threshold, cfg.lif_surrogate_slope
        d = cfg.d_model
        self.qkv_proj = nn.Linear(d, 3 * H * dk, bias=False)
        self.conv = ShortConv(3 * H * dk, cfg.conv_size, cfg.kernels)
        # LIF drive; the bias is set (see init_special) so that spikes start at ~lif_init_rate
        self.spiking, self.alpha_floor, self.beta_floor = cfg.spiking, cfg.alpha_spike_floor, cfg.beta_spike_floor
        self.drive_proj = nn.Linear(d, H * dk, bias=True) if cfg.spiking else None
        # per-channel decay magnitude a = exp(A_log[h]) * softplus(up(down(x)) + dt_bias), as in KDA
        self.decay_down = nn.Linear(d, cfg.decay_rank, bias=False)
        self.decay_up = nn.Linear(cfg.decay_rank, H * dk, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H * dk))
        self.beta_proj = nn.Linear(d, H, bias=True)
        self.gate_proj = nn.Linear(d, H * dk, bias=False)
        self.o_norm = GatedRMSNorm(dk, cfg.norm_eps, cfg.kernels)
        self.out_proj = nn.Linear(H * dk, d, bias=False)
        self.init_special()

    @torch.no_grad()
    def init_special(self):
        """Initialise the non-matrix parameters (call again after any blanket re-init)."""
        cfg = self.cfg
        # LIF steady state: mean membrane ~ theta/2 leaks (1 - lam) theta/2 per token, so a
        # mean drive mu fires at rate ~ mu/theta - (1 - lam)/2. Solve for mu at the target rate.
        if self.drive_proj is not None:
            self.drive_proj.bias.fill_(cfg.lif_threshold * (cfg.lif_init_rate + (1 - cfg.lif_decay) / 2))
        self.beta_proj.bias.zero_()
        # decay rates spread over time scales: A in [1, 16], dt log-uniform in [1e-3, 1e-1]
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def zero_state(self, batch_size: int, device) -> dict:
        H, dk = self.n_heads, self.head_dim
        return {
            "S": torch.zeros(batch_size, H, dk, dk, device=device),
            "membrane": torch.zeros(batch_size, H, dk, device=device),
            "conv": torch.zeros(batch_size, self.conv.size - 1, 3 * H * dk, device=device),
        }

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, reset: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        H, dk = self.n_heads, self.head_dim
        state = state or {}
        qkv, conv_tail = self.conv(self.qkv_proj(x), state.get("conv"), reset)
        q, k, v = ops.split_heads(qkv, H, mode=self.kernels)  # each [B, H, T, dk], q and k L2-normalised

        # spikes: LIF neurons in float32 (a membrane summed in bf16 would drift), one op with
        # log_alpha = -a * spikes (silent channel: alpha = 1) and beta = sigmoid(w x) * mean(spikes)
        rate = F.softplus(self.decay_up(self.decay_down(x)).float().view(B, T, H, dk) + self.dt_bias.view(H, dk))
        if self.spiking and self.alpha_floor >= 1:  # every channel forgets at its own rate: log alpha = -a
            a, log_alpha = None, (-self.A_log.exp())[:, None] * rate  # the LIF then skips the alpha modulation
        else:
            a = self.A_log.exp()[:, None] * rate
        if self.spiking:
            drive = self.drive_proj(x).float().view(B, T, H, dk)
            beta_logit = self.beta_proj(x).float()
            spikes, membrane, gated_log_alpha, beta = ops.lif_modulate(
                drive, a, beta_logit, self.lif_decay, self.lif_threshold, state.get("membrane"),
                reset, self.slope, mode=self.kernels)
            if a is not None:  # log alpha = -a (g + (1 - g) s) = g (-a) + (1 - g) (-a s)
                log_alpha = gated_log_alpha if self.alpha_floor <= 0 else \
                    (1 - self.alpha_floor) * gated_log_alpha - self.alpha_floor * a
            if self.beta_floor > 0:  # beta = sig * (f + (1 - f) mean(s)) = f sig + (1 - f) (sig mean(s))
                beta = self.beta_floor * torch.sigmoid(beta_logit) + (1 - self.beta_floor) * beta
        else:  # plain KDA (cfg.spiking off): the membrane is carried untouched, as zeros
            spikes, log_alpha, beta = None, -a, torch.sigmoid(self.beta_proj(x).float())
            membrane = state.get("membrane")
            if membrane is None:
                membrane = x.new_zeros(B, H, dk, dtype=torch.float32)

        log_alpha, beta = log_alpha.transpose(1, 2), beta.transpose(1, 2)  # [B, H, T, dk], [B, H, T]
        S0 = state.get("S")
        if T == 1:  # decoding: O(1) per token
            o, S = ops.kda_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], log_alpha[:, :, 0], beta[:, :, 0], S0,
                              reset=None if reset is None else reset[:, 0], mode=self.kernels)
            o = o[:, :, None]
        else:  # the compiled loop on CPU, fla's chunk_kda on CUDA, else the reference (kda_impl)
            o, S = ops.kda(q, k, v, log_alpha, beta, S0, reset=reset, chunk_size=self.chunk_size, impl=self.impl,
                         mode=self.kernels)

        gate = self.gate_proj(x).view(B, T, H, dk)
        o = self.o_norm(o.transpose(1, 2), gate)  # [B, T, H, dv]
        y = self.out_proj(o.reshape(B, T, H * dk))
        return y, {"S": S, "membrane": membrane, "conv": conv_tail}, spikes
