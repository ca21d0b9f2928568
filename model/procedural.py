"""Procedural memory (PM): Hebbian fast-weight slots, committed once per plasticity span.

Per stream, r slots of unit-norm keys K [B, r, m] and values V [B, r, m] with strengths
a [B, r] in [0, a_max] (sum <= budget), all float32. With h_t the block's normalised
input (the mixer's input):

    pre_t  = normalize(W_pre h_t)      the context at t (also the read query)
    post_t = normalize(W_post h_t)     what token t looks like to this block

Read, every token (one batched matmul per call, the memory being constant within a span):

    read_t = sum_i a_i (k_i . pre_t) v_i          ->  layer output += W_out read_t

Eligibility, every token: each (context, next) pair (pre_{t-1}, post_t) is routed to
slots by p_t = softmax(tau * cos(pre_{t-1}, router prototypes)) and accumulated into
decaying traces E_k, E_v [B, r, m] (decay rho per token). Inside a span this is a
decayed sum, i.e. one matmul, not a loop over tokens.

Commit, at every span end, under the PM neuromodulator:
  gate  G   = 1[sum_i ||E_k,i|| (1 - rho) > threshold]  (the heuristic; the head's own gate
              logit is computed and reported for phase D but not used yet)
  c_i       = G * cap * softmax(slot logits)_i           how much of slot i's trace to take
  a_i      <- base_decay * lambda^G * a_i + c_i g        (then clipped to a_max and the budget)
  k_i, v_i <- normalize(old strength * k_i + c_i g * normalize(E_k,i))   (values alike)
  E_i      <- (1 - c_i) E_i                              the committed part is consumed
So a slot's key is the strength-weighted mean direction of the contexts committed into
it, and its value the mean of what followed them. lambda, g and the slot logits are
continuous, so the LM loss reaches the neuromodulator through every read after a commit
in the same call.

Rails (hold for any input): keys/values unit norm (or zero for an empty slot), strengths
in [0, a_max] with sum <= budget, so ||read_t|| <= budget; traces bounded by 1 / (1 - rho)
per slot because pre/post are unit vectors and routing weights sum to one; at most `cap`
slot-mass committed per span.

Surprise. The LM loss is not known inside forward (the final logits of a span come after
every block has processed it, and any signal from an earlier call would make results
depend on how the stream is cut into calls). So the surprise a block reports is its own
PM prediction error: for every pair, 1 - cos(read(pre_{t-1}), post_t), i.e. how badly
the committed memory predicted what this block saw next; the span mean is the
neuromodulator's surprise input (1 when the memory is empty). It is detached: an
observation, not a path for gradients.

State (batch first): keys, values [B, r, m]; strength [B, r]; elig_k, elig_v [B, r, m];
prev [B, m] (pre of the last token); err_sum, count [B] (the open span's surprise sums).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .memory import SpanGrid, keep_streams

COMMITTED = ("keys", "values", "strength")


class PMNeuromodulator(nn.Module):
    """Span statistics -> commit controls.

    feats [B, 5]: surprise, eligibility evidence, strength used / budget, share of slots
    in use, share of the span this stream saw. slot_feats [B, r, 3]: strength / a_max,
    cos(key, key trace), slot evidence * r.
    Returns gate_logit [B], lam [B] in [0.9, 1], g [B] in (0, 1), slot_logits [B, r].
    """

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(5, hidden), nn.SiLU(), nn.Linear(hidden, 3))
        self.slot_score = nn.Linear(3, 1)

    @torch.no_grad()
    def init_special(self):
        # start near: lambda ~ 0.995, g = 0.5, slots chosen by their own evidence, weak slots first
        self.mlp[-1].bias.copy_(torch.tensor([0.0, -3.0, 0.0]))
        self.slot_score.weight.copy_(torch.tensor([[-1.0, 1.0, 4.0]]))
        self.slot_score.bias.zero_()

    def forward(self, feats: torch.Tensor, slot_feats: torch.Tensor):
        gate_logit, lam_raw, g_raw = self.mlp(feats).unbind(-1)
        lam = 1.0 - 0.1 * torch.sigmoid(lam_raw)
        return gate_logit, lam, torch.sigmoid(g_raw), self.slot_score(slot_feats).squeeze(-1)


class ProceduralMemory(nn.Module):
    """h [B, T, d] (the block's normalised input) -> (y [B, T, d] to add to the layer
    output, new state, stats, surprises). stats: 0-dim detached metrics; surprises: one
    [B] tensor per span that ended in the call (the neuromodulator's surprise input, also
    handed to the block's episodic memory). See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, m, r = cfg.d_model, cfg.mem_dim or cfg.d_model, cfg.pm_slots
        self.dim, self.slots = m, r
        self.rho, self.P = cfg.pm_rho, cfg.plasticity_span
        self.threshold, self.cap = cfg.pm_commit_threshold, cfg.pm_commit_cap
        self.a_max, self.budget, self.base_decay = cfg.pm_strength_max, cfg.pm_budget, cfg.pm_base_decay
        self.pre = nn.Linear(d, m, bias=False)
        self.post = nn.Linear(d, m, bias=False)
        self.out_proj = nn.Linear(m, d, bias=False)
        self.router = nn.Parameter(torch.randn(r, m))  # slot prototypes for routing the traces
        self.router_log_scale = nn.Parameter(torch.tensor(math.log(8.0)))
        self.neuromod = PMNeuromodulator()
        self.init_special()

    @torch.no_grad()
    def init_special(self):
        """Initialise the non-matrix parameters (call again after any blanket re-init)."""
        self.router.normal_()
        self.router_log_scale.fill_(math.log(8.0))
        self.neuromod.init_special()

    def zero_state(self, batch_size: int, device) -> dict:
        B, r, m = batch_size, self.slots, self.dim
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return {"keys": z(B, r, m), "values": z(B, r, m), "strength": z(B, r), "elig_k": z(B, r, m),
                "elig_v": z(B, r, m), "prev": z(B, m), "err_sum": z(B), "count": z(B)}

    @staticmethod
    def read(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """sum_i a_i (k_i . q) v_i. q [..., L, m]; K, V [..., r, m]; a [..., r] -> [..., L, m]."""
        return ((q @ K.transpose(-1, -2)) * a[..., None, :]) @ V

    def forward(self, h: torch.Tensor, state: Optional[dict], grid: SpanGrid, soft: bool = False):
        B, T, _ = h.shape
        st = state if state is not None else self.zero_state(B, h.device)
        with torch.autocast(h.device.type, enabled=False):
            return self._forward(h.float(), st, grid, soft)

    def _forward(self, h, st, grid, soft):
        rho = self.rho
        pre = F.normalize(self.pre(h), dim=-1)  # [B, T, m]
        post = F.normalize(self.post(h), dim=-1)
        pre_prev = torch.cat([st["prev"][:, None].float(), pre[:, :-1]], 1)  # the context each pair starts from
        route = torch.softmax(self.router_log_scale.exp() * pre_prev @ F.normalize(self.router, dim=-1).T, -1)

        # every pair's contribution to its span's traces, all spans at once: [B, n, r, m]
        pair_ok = grid.current if grid.reset is None else grid.current & ~grid.reset  # a pair never crosses documents
        pair_ok = pair_ok.expand(h.shape[0], -1, -1).float()  # [B, n, P]
        weight = pair_ok * grid.decay_weights(rho)
        pre_g, post_g = grid.to_grid(pre_prev), grid.to_grid(post)
        routed = grid.to_grid(route) * weight[..., None]  # [B, n, P, r]
        add_k = routed.transpose(-1, -2) @ pre_g
        add_v = routed.transpose(-1, -2) @ post_g
        pairs = pair_ok.sum(-1)  # [B, n]

        K, V, a = st["keys"].float(), st["values"].float(), st["strength"].float()
        Ek, Ev = st["elig_k"].float(), st["elig_v"].float()
        err_sum, count = st["err_sum"].float(), st["count"].float()
        versions, spans = [], []
        # unbound once: slicing span s inside the loop would make autograd scatter each slice's
        # gradient into a zero tensor of the whole grid, n times over (quadratic in T)
        add_k, add_v = add_k.unbind(1), add_v.unbind(1)
        for s in range(grid.n):
            versions.append((K, V, a))  # what the tokens of span s read
            keep = grid.keep(s)
            with torch.no_grad():  # surprise: how badly the committed memory predicted each pair
                pred = self.read(pre_g[:, s], K, V, a)
                if not soft and grid.since_reset is not None:
                    pred = pred * ~grid.since_reset[:, s, :, None]  # after a hard reset the memory is empty
                err = 1.0 - F.cosine_similarity(pred, post_g[:, s], dim=-1)
                err_s = (err * pair_ok[:, s]).sum(-1)
            if keep is not None:  # a document starts in this span: forget what the stream carried
                if not soft:
                    K, V, a = (keep_streams(x, keep) for x in (K, V, a))
                Ek, Ev, err_sum, count = (keep_streams(x, keep) for x in (Ek, Ev, err_sum, count))
            decay = rho ** grid.length[s]
            Ek, Ev = decay * Ek + add_k[s], decay * Ev + add_v[s]
            err_sum, count = err_sum + err_s, count + pairs[:, s]
            if grid.complete[s]:
                surprise = err_sum / count.clamp(min=1.0)
                K, V, a, Ek, Ev, info = self.commit(K, V, a, Ek, Ev, surprise, count)
                spans.append(info)
                err_sum, count = torch.zeros_like(err_sum), torch.zeros_like(count)

        Ks, Vs, As = (torch.stack(x, 1) for x in zip(*versions))  # [B, n, r, m], [B, n, r]
        out = self.read(grid.to_grid(pre), Ks, Vs, As)  # [B, n, P, m]
        if not soft and grid.since_reset is not None:
            out = out * ~grid.since_reset[..., None]
        out = grid.from_grid(out)
        new_state = {"keys": K, "values": V, "strength": a, "elig_k": Ek, "elig_v": Ev, "prev": pre[:, -1],
                     "err_sum": err_sum, "count": count}
        return self.out_proj(out), new_state, self._stats(spans, a, out), [s["surprise"] for s in spans]

    def commit(self, K, V, a, Ek, Ev, surprise, count):
        """One span end: the neuromodulator decides; eligibility is blended into the slots.
        K, V, Ek, Ev [B, r, m]; a [B, r]; surprise, count [B]. Returns the new
        (K, V, a, Ek, Ev) and detached per-stream info for the metrics."""
        r = self.slots
        slot_evidence = Ek.norm(dim=-1) * (1.0 - self.rho)  # [B, r], in [0, 1]
        evidence = slot_evidence.sum(-1)
        ek, ev = F.normalize(Ek, dim=-1), F.normalize(Ev, dim=-1)
        feats = torch.stack([surprise, evidence, a.sum(-1) / self.budget, (a > 0.01 * self.a_max).float().mean(-1),
                             count / self.P], -1).detach()
        slot_feats = torch.stack([a / self.a_max, (K * ek).sum(-1), slot_evidence * r], -1).detach()
        gate_logit, lam, g, slot_logits = self.neuromod(feats, slot_feats)

        gate = ((evidence > self.threshold) & (count > 0)).float()  # heuristic commit gate
        c = (gate[:, None] * self.cap * torch.softmax(slot_logits, -1)).clamp(max=1.0)  # [B, r]
        a_old = a * (self.base_decay * (1.0 - gate * (1.0 - lam)))[:, None]
        add = c * g[:, None]
        on = (c > 0)[..., None]
        K = torch.where(on, F.normalize(a_old[..., None] * K + add[..., None] * ek, dim=-1), K)
        V = torch.where(on, F.normalize(a_old[..., None] * V + add[..., None] * ev, dim=-1), V)
        a = (a_old + add).clamp(max=self.a_max)
        a = a * (self.budget / a.sum(-1, keepdim=True).clamp(min=self.budget))  # strength budget per stream
        Ek, Ev = Ek * (1.0 - c)[..., None], Ev * (1.0 - c)[..., None]
        info = {"commit": gate, "evidence": evidence.detach(), "surprise": surprise.detach(),
                "gate_prob": torch.sigmoid(gate_logit).detach()}
        return K, V, a, Ek, Ev, info

    @staticmethod
    def _stats(spans: list, a: torch.Tensor, out: torch.Tensor) -> dict:
        """0-dim detached metrics of one call (commit-side ones are 0 when no span ended)."""
        stats = {"pm_strength": a.detach().sum(-1).mean(), "pm_read_norm": out.detach().norm(dim=-1).mean()}
        for key in ("commit", "evidence", "surprise", "gate_prob"):
            vals = [s[key] for s in spans]
            name = "pm_commit_rate" if key == "commit" else f"pm_{key}"
            stats[name] = torch.stack(vals).mean() if vals else a.new_zeros(())
        return stats
