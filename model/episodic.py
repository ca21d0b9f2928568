"""Episodic memory (EM): a per-stream store of span summaries, novelty-gated writes,
top-k retrieval into the residual.

Per stream, M slots of unit-norm keys K [B, M, m] and values V [B, M, m] with strengths
S [B, M] in [0, s_max], float32. With u_t = RMSNorm(block output at t):

Write, at every span end. The span has two summaries, attention poolings of u over the
span's tokens of the stream's current document with weights exp(4 tanh(w . u_t)), one
w for the key and one for the value (so a key can be made of what an episode is about,
say a name, and its value of what it says, say a number); the weights are bounded, so
the running sums carried between calls cannot overflow. The candidate value is
normalize(W_v value summary); the candidate key is normalize(W_k key summary - mu), mu
the stream's running mean of W_k key summary (over span ends, detached: the plain mean of
the first ten spans, then an EMA with 0.9). Without the centring the shared component of
all summaries dominates: training drove every key to one direction (novelty ~0.005, so
the gate was noise and retrieval picked by strength alone); centred, keys differ by what
their spans differ in. Then
  S       <- decay * S                                    (every span end)
  novelty  = 1 - max_j cos(candidate key, K_j) over the filled slots (1 when none)
  delta, strength = EM neuromodulator(novelty, surprise, usage, share of span seen)
  score    = novelty + delta - (novelty_avg + threshold)
  write    = score > 0   (and the span had tokens of the document)
  the weakest slot j* = argmin S takes the candidate, with
  S_j*     = s_max * strength * sigmoid(score / 0.1)        (strength in (0.5, 1))
  novelty_avg <- 0.9 novelty_avg + 0.1 novelty
The threshold is relative to the stream's running average novelty: summaries of
ordinary text are all alike (novelty ~0.15 for every span), and their level drifts as
the projections learn, so an absolute threshold ends up writing always or never. The
write decision is a hard gate, like PM's commit gate: a heuristic (novelty above its
running average) whose learned term delta is left for phase D's reinforcement training
(it gets no gradient from the LM loss; near 0 at init, weight decay keeps it small).
Earlier versions let delta scale the written strength; the LM loss then learned to shut
writes off for good whenever reads did not pay yet, and the memory never came back. The
strength is the continuous, LM-trained output (gradient from reads later in the same
call); a more novel span is written stronger (sigmoid of the detached score), so it
outlives the ordinary ones when the weakest slot is replaced.

Read, every token, against the contents committed before its span (batched over spans):
  q_t = normalize(W_q u_t); rank the slots by cos(q_t, K_j) * S_j; keep the top k;
  o_t = sum_{j in top k} softmax_j(tau cos(q_t, K_j)) S_j V_j  ->  residual += W_o o_t
Empty slots have S = 0, so they contribute nothing; ||o_t|| <= s_max.

Surprise is the block's procedural-memory prediction error over the span
(`procedural.py` explains why not the LM loss); 0 when PM is off.

State (batch first): keys, values [B, M, m]; strength [B, M]; novelty_avg [B],
key_mean [B, m] and key_spans [B] (its count; all kept with the contents); pool_sum
[B, 2, d] and pool_mass [B, 2] (the open span's running key and value poolings).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import RMSNorm
from .memory import SpanGrid, keep_streams

COMMITTED = ("keys", "values", "strength", "novelty_avg", "key_mean", "key_spans")
GATE_TEMPERATURE = 0.1
NOVELTY_EMA = 0.9
KEY_MEAN_EMA = 0.9


class EMNeuromodulator(nn.Module):
    """feats [B, 4]: novelty, surprise, mean strength / s_max, share of the span seen ->
    (novelty adjustment delta [B] in [-0.5, 0.5], strength [B] in (0.5, 1)).

    The strength is floored at half: trained by the LM loss alone, it was driven towards
    0 early in training, while reads were still noise, and with it every read and the
    gradient that could have made them useful (read norm 0.01 after 1.4k steps); the
    output projection is left as the place where the model may turn the memory down."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    @torch.no_grad()
    def init_special(self):
        self.mlp[-1].bias.copy_(torch.tensor([0.0, 1.0]))  # delta ~ 0, strength ~ 0.87

    def forward(self, feats: torch.Tensor):
        delta, strength = self.mlp(feats).unbind(-1)
        return 0.5 * torch.tanh(delta), 0.5 + 0.5 * torch.sigmoid(strength)


class EpisodicMemory(nn.Module):
    """x [B, T, d] (the block's output) -> (y [B, T, d] to add to the residual, new
    state, stats). See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, m = cfg.d_model, cfg.mem_dim or cfg.d_model
        self.dim, self.slots, self.topk = m, cfg.em_slots, cfg.em_topk
        self.threshold, self.decay, self.s_max = cfg.em_novelty_threshold, cfg.em_decay, cfg.em_strength_max
        self.P = cfg.plasticity_span
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, m, bias=False)
        self.k_proj = nn.Linear(d, m, bias=False)
        self.v_proj = nn.Linear(d, m, bias=False)
        self.out_proj = nn.Linear(m, d, bias=False)
        self.pool = nn.Linear(d, 2, bias=False)  # which tokens the key / value summaries are made of
        self.log_tau = nn.Parameter(torch.tensor(math.log(10.0)))  # sharpness of the top-k attention
        self.neuromod = EMNeuromodulator()
        self.init_special()

    @torch.no_grad()
    def init_special(self):
        """Initialise the non-matrix parameters (call again after any blanket re-init)."""
        self.log_tau.fill_(math.log(10.0))
        self.neuromod.init_special()

    def zero_state(self, batch_size: int, device) -> dict:
        B, M, m = batch_size, self.slots, self.dim
        d = self.norm.weight.shape[0]
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return {"keys": z(B, M, m), "values": z(B, M, m), "strength": z(B, M), "novelty_avg": z(B),
                "key_mean": z(B, m), "key_spans": z(B), "pool_sum": z(B, 2, d), "pool_mass": z(B, 2)}

    def forward(self, x: torch.Tensor, state: Optional[dict], grid: SpanGrid, soft: bool = False,
                surprises: Optional[list] = None):
        """surprises: one [B] tensor per span that ends in this call (None: zeros)."""
        B = x.shape[0]
        st = state if state is not None else self.zero_state(B, x.device)
        with torch.autocast(x.device.type, enabled=False):
            return self._forward(x.float(), st, grid, soft, surprises)

    def _forward(self, x, st, grid, soft, surprises):
        B = x.shape[0]
        u = self.norm(x)  # [B, T, d]
        # span summaries, all spans at once: attention poolings over the current document's tokens
        w = torch.exp(4.0 * torch.tanh(self.pool(u)))  # [B, T, 2] in [e^-4, e^4]: key and value pooling
        w = grid.to_grid(w) * grid.current[..., None]  # [B, n, P, 2]
        mass, total = w.sum(2), w.transpose(-1, -2) @ grid.to_grid(u)  # [B, n, 2], [B, n, 2, d]
        keep0 = grid.keep(0)  # the open span carried in from the previous call
        first_mass = mass[:, :1] + keep_streams(st["pool_mass"].float(), keep0)[:, None]
        first_total = total[:, :1] + keep_streams(st["pool_sum"].float(), keep0)[:, None]
        masses, total = torch.cat([first_mass, mass[:, 1:]], 1), torch.cat([first_total, total[:, 1:]], 1)
        summary = total / masses.clamp(min=1e-6)[..., None]
        raw_k = self.k_proj(summary[:, :, 0])  # [B, n, m], centred and normalised at the write
        cand_v = F.normalize(self.v_proj(summary[:, :, 1]), dim=-1)
        mass = masses[..., 0]  # [B, n], > 0 exactly when the span has tokens of the current document

        K, V, S, avg, key_mean, key_spans = (st[k].float() for k in COMMITTED)
        versions, writes, ended = [], [], 0
        for s in range(grid.n):
            versions.append((K, V, S))  # what the tokens of span s read
            keep = grid.keep(s)
            if keep is not None and not soft:  # hard reset: the stream's episodes are gone
                K, V, S, avg, key_mean, key_spans = (keep_streams(t, keep)
                                                     for t in (K, V, S, avg, key_mean, key_spans))
            if grid.complete[s]:
                surprise = surprises[ended] if surprises else S.new_zeros(B)
                key = F.normalize(raw_k[:, s] - key_mean, dim=-1)
                # running mean, exact over the first spans (a zero start would stay in it for long)
                rate = torch.where(mass[:, s] > 0, (1.0 / (key_spans + 1.0)).clamp(min=1 - KEY_MEAN_EMA), 0.0)
                key_mean = key_mean + rate[:, None] * (raw_k[:, s].detach() - key_mean)
                key_spans = key_spans + (mass[:, s] > 0).float()
                K, V, S, avg, info = self.write(K, V, S, avg, key, cand_v[:, s], mass[:, s], surprise)
                writes.append(info)
                ended += 1
        pool_sum, pool_mass = total[:, -1], masses[:, -1]
        if grid.complete[-1]:
            pool_sum, pool_mass = torch.zeros_like(pool_sum), torch.zeros_like(pool_mass)

        out = self.retrieve(grid.to_grid(F.normalize(self.q_proj(u), dim=-1)), *(torch.stack(t, 1) for t in zip(*versions)))
        if not soft and grid.since_reset is not None:
            out = out * ~grid.since_reset[..., None]
        out = grid.from_grid(out)
        new_state = {"keys": K, "values": V, "strength": S, "novelty_avg": avg, "key_mean": key_mean,
                     "key_spans": key_spans, "pool_sum": pool_sum, "pool_mass": pool_mass}
        return self.out_proj(out), new_state, self._stats(writes, S, out)

    def write(self, K, V, S, avg, key, value, mass, surprise):
        """One span end. K, V [B, M, m]; S [B, M]; avg, mass, surprise [B]; key, value [B, m]
        (unit). Returns the new (K, V, S, avg) and detached per-stream info for the metrics."""
        S = S * self.decay
        filled = S > 0
        cos = (K @ key[:, :, None]).squeeze(-1)  # [B, M]
        best = torch.where(filled, cos, torch.full_like(cos, -1.0)).amax(-1)
        novelty = torch.where(filled.any(-1), 1.0 - best, torch.ones_like(best)).detach()
        feats = torch.stack([novelty, surprise, S.mean(-1) / self.s_max, (mass > 0).float()], -1).detach()
        delta, strength = self.neuromod(feats)
        score = novelty + delta - (avg + self.threshold)
        seen = mass > 0
        write = ((score > 0) & seen).float()
        avg = torch.where(seen, NOVELTY_EMA * avg + (1 - NOVELTY_EMA) * novelty, avg)
        slot = F.one_hot(S.argmin(-1), self.slots).float() * write[:, None]  # the weakest slot, where writing
        K = K * (1.0 - slot[..., None]) + slot[..., None] * key[:, None]
        V = V * (1.0 - slot[..., None]) + slot[..., None] * value[:, None]
        new_strength = self.s_max * strength * torch.sigmoid(score.detach() / GATE_TEMPERATURE)
        S = S * (1.0 - slot) + slot * new_strength[:, None]
        return K, V, S, avg, {"write": write, "novelty": novelty}

    def retrieve(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """Top-k cross-attention. q [B, n, L, m] (unit); K, V [B, n, M, m]; S [B, n, M] -> [B, n, L, m]."""
        cos = q @ K.transpose(-1, -2)  # [B, n, L, M]
        strength = S[:, :, None, :].expand_as(cos)
        k = min(self.topk, self.slots)
        idx = (cos * strength).detach().topk(k, dim=-1).indices
        att = torch.softmax(self.log_tau.exp() * cos.gather(-1, idx), -1) * strength.gather(-1, idx)
        weights = torch.zeros_like(cos).scatter(-1, idx, att)  # sparse rows: a batched matmul reads V
        return weights @ V

    @staticmethod
    def _stats(writes: list, S: torch.Tensor, out: torch.Tensor) -> dict:
        stats = {"em_strength": S.detach().mean(), "em_read_norm": out.detach().norm(dim=-1).mean()}
        for key, name in (("write", "em_write_rate"), ("novelty", "em_novelty")):
            vals = [w[key] for w in writes]
            stats[name] = torch.stack(vals).mean() if vals else S.new_zeros(())
        return stats
