"""Model hyper-parameters: the `model` section of a preset.

Every field here is a preset key (`"model": {"d_model": 512, ...}`); the preset
validator reads the type hints and defaults from this dataclass, so adding a field
here is all it takes to add a key. `vocab_size` is not a preset key: it comes from
the tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ModelConfig:
    arch: Literal["transformer", "hatchling"] = "transformer"
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    mlp_mult: float = 8 / 3  # SwiGLU hidden size = mlp_mult * d_model, rounded up to 64
    dropout: float = 0.0
    rope_theta: float = 10000.0  # transformer only (hatchling's attention is NoPE)
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # --- hatchling (Spike-KDA hybrid) ---
    global_every: int = 4  # every n-th layer is working-memory softmax attention
    wm_window: int = 512  # cached keys/values from earlier steps seen by WM attention
    chunk_size: int = 64  # chunk length of the parallel KDA form
    conv_size: int = 4  # short causal depthwise conv on q/k/v
    decay_rank: int = 32  # low-rank projection producing the per-channel decay
    lif_decay: float = 0.9  # membrane leak per token
    lif_threshold: float = 1.0
    kda_impl: Literal["chunk", "recurrent"] = "chunk"  # training form of the KDA layer
    kernels: Literal["auto", "reference"] = "auto"  # fused CUDA kernels where they build; "reference" forces PyTorch
    lif_init_rate: float = 0.3  # spike rate the LIF drive bias is set for at init
    lif_surrogate_slope: float = 5.0  # fast-sigmoid surrogate: 1 / (1 + slope * |v - threshold|)^2
    # False: plain KDA, the ablation of the spikes: alpha and beta straight from their projections
    # (every channel decays and every head writes at every token), no LIF neurons
    spiking: bool = True
    # share of a head's write strength its spikes do not gate: beta = sigmoid(w x) * (f + (1 - f) * mean(s));
    # 0 = a head writes only in proportion to its spike rate, 1 = spikes gate forgetting only
    beta_spike_floor: float = 0.0
    # share of a channel's forgetting its spikes do not gate: log alpha = -a * (g + (1 - g) * s);
    # 0 = a channel forgets only when it spikes, 1 = spikes gate writing only
    alpha_spike_floor: float = 0.0
    # --- memories (hatchling only; model/procedural.py, model/episodic.py) ---
    # The trainer maps train.phase onto these: A off, B pm, C pm+em, E pm+em+lifelong.
    pm_enabled: bool = False  # procedural memory: Hebbian fast-weight slots, one per block
    em_enabled: bool = False  # episodic memory: remembered tokens extend each WM block's window
    lifelong: bool = False  # soft resets: a document boundary keeps committed PM/EM contents
    mem_dim: int = 0  # width of the procedural memory's keys/values; 0 = d_model
    plasticity_span: int = 32  # P: tokens per span; commits and writes happen at span ends
    pm_slots: int = 16  # r: key/value slots per stream
    pm_rho: float = 0.95  # eligibility trace decay per token
    pm_commit_threshold: float = 0.3  # heuristic gate: commit when the eligibility evidence exceeds this
    pm_commit_cap: float = 1.0  # most slot-mass blended in per span (sum of the per-slot commit fractions)
    pm_strength_max: float = 1.0  # per-slot strength cap
    pm_budget: float = 4.0  # per-stream cap on the sum of slot strengths
    pm_base_decay: float = 0.999  # strengths decay by this every span
    em_slots: int = 64  # M: episodic slots (remembered tokens) per stream and WM block
    em_topk: int = 4  # slots retrieved per query
    em_writes_per_span: int = 2  # c: candidates per span, its most salient tokens
    # a candidate is written when its novelty (1 - max cos to the stored keys, about their mean) plus a
    # learned term exceeds this: near-copies of a stored key are not stored again
    em_novelty_threshold: float = 0.02
    em_decay: float = 0.999  # strengths decay by this every span
    em_strength_max: float = 1.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        h = int(self.mlp_mult * self.d_model)
        return (h + 63) // 64 * 64

    def check(self) -> list[tuple[str, str]]:
        """Cross-field checks: (key, problem) pairs, empty when consistent."""
        problems = []
        if self.n_heads < 1 or self.kv_heads < 1:  # the divisibility checks below need heads
            return [("n_heads" if self.n_heads < 1 else "n_kv_heads", "must be at least 1")]
        if self.d_model % self.n_heads:
            problems.append(("d_model", f"must be divisible by n_heads ({self.n_heads})"))
        if self.n_heads % self.kv_heads:
            problems.append(("n_kv_heads", f"must divide n_heads ({self.n_heads})"))
        for key in ("d_model", "n_layers", "n_heads", "global_every", "chunk_size"):
            if getattr(self, key) < 1:
                problems.append((key, "must be at least 1"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", "must be in [0, 1)"))
        for key in ("plasticity_span", "pm_slots", "em_slots", "em_topk", "em_writes_per_span"):
            if getattr(self, key) < 1:
                problems.append((key, "must be at least 1"))
        if self.em_topk > self.em_slots:
            problems.append(("em_topk", f"must be at most em_slots ({self.em_slots})"))
        if self.mem_dim < 0:
            problems.append(("mem_dim", "must be >= 0 (0 = d_model)"))
        for key in ("pm_rho", "pm_base_decay", "em_decay"):
            if not 0.0 < getattr(self, key) <= 1.0:
                problems.append((key, "must be in (0, 1]"))
        for key in ("pm_commit_cap", "pm_strength_max", "pm_budget", "em_strength_max"):
            if getattr(self, key) <= 0:
                problems.append((key, "must be positive"))
        if (self.pm_enabled or self.em_enabled or self.lifelong) and self.arch != "hatchling":
            problems.append(("arch", "memories (pm_enabled, em_enabled, lifelong) need arch \"hatchling\""))
        if self.em_enabled and self.arch == "hatchling" and self.global_every > self.n_layers:
            problems.append(("global_every", f"episodic memory lives in the WM attention blocks: needs at least one "
                                             f"(global_every <= n_layers = {self.n_layers})"))
        return problems


@dataclass
class AuxHeadsConfig:
    """Auxiliary training heads (`model/aux_heads.py`); every head is off by default.

    A head is on when its weight is > 0; a head that is off is not built at all (no
    parameters, nothing for DDP or the optimizer). Each weighted term is added to the
    training loss: total = CE + sum(weight_i * aux_i). `train.config.AuxiliaryConfig`
    inherits these fields, so they are keys of a preset's `auxiliary` section.
    """
    # policy head: next-token distribution from an internal layer, KL to the (detached) LM head
    policy_kl_weight: float = 0.0
    policy_layer: int = -1  # blocks below the policy head (its input is block policy_layer-1's output); -1 = n_layers // 2
    policy_token_fraction: float = 0.25  # share of positions the KL is computed on (a full-vocab matmul each)
    # value head: mean NLL of the next value_horizon tokens (detached LM logits), Huber regression
    value_weight: float = 0.0
    value_horizon: int = 8
    # dynamics module: (final hidden, next token embedding) -> final hidden one step ahead, chained
    dynamics_weight: float = 0.0
    dynamics_steps: int = 1  # k: chained prediction steps (1-3)
    dynamics_loss: Literal["cosine", "mse"] = "cosine"
    # span contrastive: InfoNCE between a masked span's predicted and true representation
    span_contrastive_weight: float = 0.0
    span_mask_fraction: float = 0.15  # span length = round(fraction * sequence length), one span per sequence
    span_temperature: float = 0.1
    span_l2_normalize: bool = True
    span_right_context: bool = False  # let the predictor also see hidden states after the span (they attended to it)

    def check_heads(self, n_layers: Optional[int] = None) -> list[tuple[str, str]]:
        """Cross-field checks: (key, problem) pairs, empty when consistent."""
        problems = []
        for key in ("policy_kl_weight", "value_weight", "dynamics_weight", "span_contrastive_weight"):
            if getattr(self, key) < 0:
                problems.append((key, "must be >= 0"))
        if not 0.0 < self.policy_token_fraction <= 1.0:
            problems.append(("policy_token_fraction", "must be in (0, 1]"))
        if n_layers is not None and self.policy_kl_weight > 0 and not (
                self.policy_layer == -1 or 1 <= self.policy_layer <= n_layers):
            problems.append(("policy_layer", f"must be -1 or in [1, n_layers] (n_layers = {n_layers})"))
        if self.value_horizon < 1:
            problems.append(("value_horizon", "must be at least 1"))
        if not 1 <= self.dynamics_steps <= 3:
            problems.append(("dynamics_steps", "must be 1, 2 or 3"))
        if not 0.0 < self.span_mask_fraction < 1.0:
            problems.append(("span_mask_fraction", "must be in (0, 1)"))
        if self.span_temperature <= 0:
            problems.append(("span_temperature", "must be positive"))
        return problems
