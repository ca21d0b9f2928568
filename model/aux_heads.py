"""Auxiliary training heads, read off a language model's hidden states during training.

    heads = AuxHeads.build(aux_cfg, model_cfg, vocab_size)  # None when every head is off
    aux = heads(tokens, hidden, logits, embed_weight, mid)   # in forward, training only

    tokens:       [B, T] int64, the model's input
    hidden:       [B, T, d] the final hidden state (after the final norm, what the LM head reads)
    logits:       [B, T, V] the LM head's logits (only ever used detached, as a teacher/target)
    embed_weight: [V, d] the tied embedding table (only ever used detached)
    mid:          [B, T, d] output of block `heads.tap_layer` (the policy head's input), or None

Heads (a head is on when its weight is > 0; an off head is not built, so it has no
parameters). Each returns "loss/<name>" (weighted: added to the training loss as is)
and "metric/aux/<name>" (the unweighted value, detached):

- policy_kl: a small head on a middle block's output predicts the next-token
  distribution through the (detached) tied unembedding; KL(LM || policy) with the LM
  distribution detached, on a random `policy_token_fraction` of the positions. Its
  gradient reaches the blocks below the tap, never the LM head, the blocks above or the
  embedding table.
- value: an MLP on the final hidden state at t predicts the mean NLL of tokens
  t+1..t+H under the (detached) LM logits; Huber loss; positions whose window leaves
  the sequence are left out.
- dynamics: z_0 = h_t, z_j = z_{j-1} + MLP(norm z_{j-1}, norm emb(token_{t+j})) predicts
  h_{t+j} (detached), j = 1..k; cosine (1 - cos) or MSE. The one-step error per token is
  returned as "signal/surprise" [B, T] (detached; entry s is the error of predicting
  h_s from h_{s-1} and token s, 0 at s = 0) and its mean as "metric/aux/surprise".
- span_contrastive: one random span of round(span_mask_fraction * T) tokens per
  sequence. Its true representation is a projection of the mean hidden state inside the
  span; the predicted one comes from a context encoder that only ever receives hidden
  states outside the span (zeroed inside before any computation), by attention pooling
  with a learned distance bias plus the state just before the span (and, with
  span_right_context, the states after it). InfoNCE over the batch's spans with
  `span_temperature` and optional L2 normalisation; "metric/aux/span_acc" is the top-1
  match rate.

Parameter names are stable (aux_heads.policy.*, aux_heads.value.*, aux_heads.dynamics.*,
aux_heads.span.*), independent of which other heads are on, so a checkpoint without a
head loads with strict=False and reports exactly that head's keys as missing.
Every built head touches all its parameters on every training step (DDP needs no
find_unused_parameters).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AuxHeadsConfig, ModelConfig
from .layers import RMSNorm

_NLL_CHUNK_ROWS = 8192  # rows of [rows, V] logits turned into float at a time (bounds memory)


def heads_on(cfg: Optional[AuxHeadsConfig]) -> bool:
    return cfg is not None and any(w > 0 for w in (cfg.policy_kl_weight, cfg.value_weight, cfg.dynamics_weight,
                                                  cfg.span_contrastive_weight))


def _touch(module: nn.Module) -> torch.Tensor:
    """0 * (sum of the module's parameters): a zero loss that still reaches every parameter,
    for steps where a head has nothing to predict (keeps DDP's reducer satisfied)."""
    return sum(p.sum() for p in module.parameters()) * 0.0


@torch.no_grad()
def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T-1] float: -log p(tokens[:, s+1] | logits[:, s]), computed without gradient."""
    B, T, V = logits.shape
    flat, target = logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)
    out = torch.empty(flat.shape[0], device=logits.device, dtype=torch.float32)
    for i in range(0, flat.shape[0], _NLL_CHUNK_ROWS):
        out[i:i + _NLL_CHUNK_ROWS] = F.cross_entropy(flat[i:i + _NLL_CHUNK_ROWS].float(),
                                                     target[i:i + _NLL_CHUNK_ROWS], reduction="none")
    return out.view(B, T - 1)


def value_targets(logits: torch.Tensor, tokens: torch.Tensor, horizon: int) -> torch.Tensor:
    """[B, T-H] (detached): entry t is the mean NLL of tokens t+1..t+H under the LM logits.
    Positions t > T-1-H (window leaving the sequence) have no entry."""
    nll = token_nll(logits, tokens)
    if nll.shape[1] < horizon:
        return nll[:, :0]
    return nll.unfold(1, horizon, 1).mean(-1)


class PolicyHead(nn.Module):
    """mid [N, d] -> logits [N, V] through the given (detached) unembedding. The mixing
    matrix starts as the identity, so the head starts as the 'logit lens' of its layer."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d, eps)
        self.mix = nn.Linear(d, d, bias=False)
        nn.init.eye_(self.mix.weight)

    def forward(self, mid: torch.Tensor, unembed: torch.Tensor) -> torch.Tensor:
        return self.mix(self.norm(mid)) @ unembed.t()


class ValueHead(nn.Module):
    """h [..., d] -> predicted mean future NLL [...]. The output bias starts at log(V),
    the NLL of a uniform guess, so the first steps do not see a huge regression error."""

    def __init__(self, d: int, vocab_size: int, std: float):
        super().__init__()
        self.up = nn.Linear(d, d)
        self.out = nn.Linear(d, 1)
        for lin in (self.up, self.out):
            nn.init.normal_(lin.weight, 0.0, std)
            nn.init.zeros_(lin.bias)
        nn.init.constant_(self.out.bias, math.log(vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.up(h))).squeeze(-1)


class DynamicsModule(nn.Module):
    """One latent step: z' = z + MLP([norm z, norm e]). z, e: [..., d] -> [..., d]."""

    def __init__(self, d: int, eps: float, std: float):
        super().__init__()
        self.norm_z = RMSNorm(d, eps)
        self.norm_e = RMSNorm(d, eps)
        self.up = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, d)
        for lin in (self.up, self.out):
            nn.init.normal_(lin.weight, 0.0, std)
            nn.init.zeros_(lin.bias)

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return z + self.out(F.gelu(self.up(torch.cat([self.norm_z(z), self.norm_e(e)], dim=-1))))


class SpanContrastive(nn.Module):
    """Predictor (context encoder that never sees the span's hidden states) and the
    target projection of the true span representation."""

    N_BUCKETS = 8  # log2-distance buckets per side: 1, 2-3, 4-7, ..., >=128

    def __init__(self, d: int, eps: float, std: float, right_context: bool):
        super().__init__()
        self.right_context = right_context
        self.key = nn.Linear(d, d, bias=False)
        self.query = nn.Parameter(torch.empty(d))
        self.dist_bias = nn.Parameter(torch.zeros(2 * self.N_BUCKETS))  # [left buckets, right buckets]
        n_in = (3 if right_context else 2) * d  # pooled context, state before the span[, state after it]
        self.norm = RMSNorm(n_in, eps)
        self.pred_up = nn.Linear(n_in, d)
        self.pred_out = nn.Linear(d, d)
        self.target = nn.Linear(d, d)
        nn.init.normal_(self.query, 0.0, 1.0)
        for lin in (self.key, self.pred_up, self.pred_out, self.target):
            nn.init.normal_(lin.weight, 0.0, std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def predict(self, h: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
        """h [B, T, d], span [starts, starts+length) per row (starts >= 1) -> [B, d].
        Hidden states inside the span are replaced by zeros before anything reads them."""
        B, T, d = h.shape
        pos = torch.arange(T, device=h.device)[None, :]
        s, e = starts[:, None], starts[:, None] + length
        left, right = pos < s, pos >= e
        allowed = (left | right) if self.right_context else left
        hc = torch.where(allowed[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        dist = torch.where(left, s - pos, pos - e + 1).clamp_min(1)
        bucket = torch.log2(dist.float()).floor().long().clamp_max(self.N_BUCKETS - 1) + self.N_BUCKETS * right.long()
        score = (self.key(hc) @ self.query.to(hc.dtype)).float() / math.sqrt(d) + self.dist_bias[bucket]
        attn = score.masked_fill(~allowed, float("-inf")).softmax(-1)
        pooled = torch.einsum("bt,btd->bd", attn.to(hc.dtype), hc)
        rows = torch.arange(B, device=h.device)
        feats = [pooled, hc[rows, starts - 1]]
        if self.right_context:
            after = (starts + length).clamp_max(T - 1)
            feats.append(hc[rows, after] * (starts + length < T)[:, None].to(hc.dtype))
        return self.pred_out(F.gelu(self.pred_up(self.norm(torch.cat(feats, dim=-1)))))

    def true_repr(self, h: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
        """Projection of the mean hidden state inside each row's span: [B, d]."""
        idx = starts[:, None] + torch.arange(length, device=h.device)[None, :]
        span = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
        return self.target(span.mean(1))


class AuxHeads(nn.Module):
    """The heads that are on (see the module docstring); forward -> aux dict."""

    def __init__(self, cfg: AuxHeadsConfig, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        problems = cfg.check_heads(model_cfg.n_layers)
        if problems:
            raise ValueError("; ".join(f"auxiliary.{k}: {m}" for k, m in problems))
        self.cfg = cfg
        d, eps, std = model_cfg.d_model, model_cfg.norm_eps, model_cfg.init_std
        self.tap_layer: Optional[int] = None  # 0-based block whose output feeds the policy head
        self.policy = self.value = self.dynamics = self.span = None
        if cfg.policy_kl_weight > 0:
            layers = cfg.policy_layer if cfg.policy_layer != -1 else max(1, model_cfg.n_layers // 2)
            self.tap_layer = layers - 1
            self.policy = PolicyHead(d, eps)
        if cfg.value_weight > 0:
            self.value = ValueHead(d, vocab_size, std)
        if cfg.dynamics_weight > 0:
            self.dynamics = DynamicsModule(d, eps, std)
        if cfg.span_contrastive_weight > 0:
            self.span = SpanContrastive(d, eps, std, cfg.span_right_context)

    @classmethod
    def build(cls, cfg: Optional[AuxHeadsConfig], model_cfg: ModelConfig, vocab_size: int) -> Optional["AuxHeads"]:
        """The heads, or None when cfg is None or every head is off (then nothing is built)."""
        return cls(cfg, model_cfg, vocab_size) if heads_on(cfg) else None

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor, embed_weight: torch.Tensor,
                mid: Optional[torch.Tensor] = None) -> dict:
        cfg, aux = self.cfg, {}

        def put(name: str, weight: float, value: torch.Tensor):
            aux[f"loss/{name}"] = weight * value
            aux[f"metric/aux/{name}"] = value.detach()

        if self.policy is not None:
            if mid is None:
                raise ValueError("the policy head needs `mid`, the output of block tap_layer")
            put("policy_kl", cfg.policy_kl_weight, self.policy_loss(mid, logits, embed_weight))
        if self.value is not None:
            put("value", cfg.value_weight, self.value_loss(hidden, logits, tokens))
        if self.dynamics is not None:
            loss, surprise = self.dynamics_loss(hidden, tokens, embed_weight)
            put("dynamics", cfg.dynamics_weight, loss)
            aux["signal/surprise"] = surprise
            aux["metric/aux/surprise"] = surprise[:, 1:].mean() if surprise.shape[1] > 1 else surprise.sum() * 0
        if self.span is not None:
            loss, acc = self.span_loss(hidden)
            put("span_contrastive", cfg.span_contrastive_weight, loss)
            aux["metric/aux/span_acc"] = acc
        return aux

    # -- the losses (unweighted) ---------------------------------------------------------
    def policy_loss(self, mid: torch.Tensor, logits: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        """KL(LM || policy) per position (batch mean) on a random share of the positions."""
        B, T, V = logits.shape
        n = B * T
        k = max(1, int(round(self.cfg.policy_token_fraction * n)))
        mid_f, teacher = mid.reshape(n, -1), logits.detach().reshape(n, V)
        if k < n:
            idx = torch.randperm(n, device=logits.device)[:k]
            mid_f, teacher = mid_f[idx], teacher[idx]
        student = self.policy(mid_f, embed_weight.detach()).float().log_softmax(-1)
        return F.kl_div(student, teacher.float().log_softmax(-1), reduction="batchmean", log_target=True)

    def value_loss(self, hidden: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        target = value_targets(logits, tokens, self.cfg.value_horizon)
        n = target.shape[1]
        if n == 0:
            return _touch(self.value)
        pred = self.value(hidden[:, :n]).float()
        return F.smooth_l1_loss(pred, target)

    def dynamics_loss(self, hidden: torch.Tensor, tokens: torch.Tensor, embed_weight: torch.Tensor):
        """(mean error over every chained step and valid position, surprise [B, T])."""
        B, T, _ = hidden.shape
        k = min(self.cfg.dynamics_steps, T - 1)
        if k < 1:
            return _touch(self.dynamics), hidden.new_zeros(B, T, dtype=torch.float32)
        emb = F.embedding(tokens, embed_weight.detach())
        target = hidden.detach()
        z, errors = hidden, []
        for j in range(1, k + 1):
            n = T - j  # z_{j-1}[:, t] stands for h_{t+j-1}; predict h_{t+j} for t < T - j
            z = self.dynamics(z[:, :n], emb[:, j:j + n])
            errors.append(self._error(z, target[:, j:j + n]))
        loss = torch.cat([e.flatten() for e in errors]).mean()
        surprise = F.pad(errors[0].detach(), (1, 0))
        return loss, surprise

    def _error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.cfg.dynamics_loss == "mse":
            return (pred - target).pow(2).mean(-1)
        return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)

    def span_length(self, T: int) -> int:
        return min(max(1, round(self.cfg.span_mask_fraction * T)), T - 1)

    def span_loss(self, hidden: torch.Tensor, starts: Optional[torch.Tensor] = None):
        """(InfoNCE over the batch's spans, top-1 accuracy). starts: [B] span starts (random
        in [1, T-L] when None)."""
        B, T, _ = hidden.shape
        if T < 2:
            return _touch(self.span), hidden.new_zeros((), dtype=torch.float32)
        length = self.span_length(T)
        if starts is None:
            starts = torch.randint(1, T - length + 1, (B,), device=hidden.device)
        pred = self.span.predict(hidden, starts, length).float()
        true = self.span.true_repr(hidden, starts, length).float()
        if self.cfg.span_l2_normalize:
            pred, true = F.normalize(pred, dim=-1), F.normalize(true, dim=-1)
        scores = pred @ true.t() / self.cfg.span_temperature
        labels = torch.arange(B, device=hidden.device)
        loss = F.cross_entropy(scores, labels)
        acc = (scores.detach().argmax(-1) == labels).float().mean()
        return loss, acc
