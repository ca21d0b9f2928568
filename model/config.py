"""Model hyper-parameters: the `model` section of a preset.

Every field here is a preset key (`"model": {"d_model": 512, ...}`); the preset
validator reads the type hints and defaults from this dataclass, so adding a field
here is all it takes to add a key. `vocab_size` is not a preset key: it comes from
the tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


def ranged(default, interval: str):
    """A numeric preset key's field: its default and its valid interval ("[0, 1)": 0
    allowed, 1 not), which the preset validator checks (presets/rules.py)."""
    return field(default=default, metadata={"range": interval})


@dataclass
class ModelConfig:
    arch: Literal["transformer", "hatchling"] = "transformer"
    d_model: int = ranged(256, "[8, 16384]")
    n_layers: int = ranged(4, "[1, 512]")
    n_heads: int = ranged(4, "[1, 512]")
    n_kv_heads: Optional[int] = ranged(None, "[1, 512]")  # grouped-query attention; None = n_heads
    mlp_mult: float = ranged(8 / 3, "(0, 32]")  # SwiGLU hidden size = mlp_mult * d_model, rounded up to 64
    dropout: float = ranged(0.0, "[0, 1)")
    rope_theta: float = ranged(10000.0, "[1, 1e9]")  # transformer only (hatchling's attention is NoPE)
    norm_eps: float = ranged(1e-6, "(0, 0.1]")
    init_std: float = ranged(0.02, "(0, 1]")
    # --- hatchling (Spike-KDA hybrid) ---
    global_every: int = ranged(4, "[1, 512]")  # every n-th layer is working-memory softmax attention
    wm_window: int = ranged(512, "[0, 1048576]")  # cached keys/values from earlier steps seen by WM attention
    chunk_size: int = ranged(64, "[1, 4096]")  # chunk length of the parallel KDA form
    conv_size: int = ranged(4, "[1, 128]")  # short causal depthwise conv on q/k/v
    decay_rank: int = ranged(32, "[1, 16384]")  # low-rank projection producing the per-channel decay
    lif_decay: float = ranged(0.9, "(0, 1]")  # membrane leak per token
    lif_threshold: float = ranged(1.0, "(0, 1000]")
    kda_impl: Literal["chunk", "recurrent"] = "chunk"  # training form of the KDA layer
    # fast paths (model/ops): "auto" = compiled C loops on CPU, Triton / fla chunk_kda on CUDA, each checked
    # against its reference on first use; "reference" = the PyTorch references only
    kernels: Literal["auto", "reference"] = "auto"
    lif_init_rate: float = ranged(0.3, "(0, 1)")  # spike rate the LIF drive bias is set for at init
    lif_surrogate_slope: float = ranged(5.0, "(0, 1000]")  # fast-sigmoid surrogate: 1 / (1 + slope * |v - threshold|)^2
    # False: plain KDA, the ablation of the spikes: alpha and beta straight from their projections
    # (every channel decays and every head writes at every token), no LIF neurons
    spiking: bool = True
    # share of a head's write strength its spikes do not gate: beta = sigmoid(w x) * (f + (1 - f) * mean(s));
    # 0 = a head writes only in proportion to its spike rate, 1 = spikes gate forgetting only
    beta_spike_floor: float = ranged(0.0, "[0, 1]")
    # share of a channel's forgetting its spikes do not gate: log alpha = -a * (g + (1 - g) * s);
    # 0 = a channel forgets only when it spikes, 1 = spikes gate writing only
    alpha_spike_floor: float = ranged(0.0, "[0, 1]")
    # --- memories (hatchling only; model/procedural.py, model/episodic.py) ---
    # The trainer maps train.phase onto these: A off, B pm, C pm+em, E pm+em+lifelong.
    pm_enabled: bool = False  # procedural memory: Hebbian fast-weight slots, one per block
    em_enabled: bool = False  # episodic memory: remembered tokens extend each WM block's window
    lifelong: bool = False  # soft resets: a document boundary keeps committed PM/EM contents
    mem_dim: int = ranged(0, "[0, 16384]")  # width of the procedural memory's keys/values; 0 = d_model
    plasticity_span: int = ranged(32, "[1, 65536]")  # P: tokens per span; commits and writes happen at span ends
    pm_slots: int = ranged(16, "[1, 65536]")  # r: key/value slots per stream
    pm_rho: float = ranged(0.95, "(0, 1]")  # eligibility trace decay per token
    pm_commit_threshold: float = ranged(0.3, "[-1000, 1000]")  # heuristic gate: commit when the eligibility evidence exceeds this
    pm_commit_cap: float = ranged(1.0, "(0, 1000]")  # most slot-mass blended in per span (sum of the per-slot commit fractions)
    pm_strength_max: float = ranged(1.0, "(0, 1000]")  # per-slot strength cap
    pm_budget: float = ranged(4.0, "(0, 1e6]")  # per-stream cap on the sum of slot strengths
    pm_base_decay: float = ranged(0.999, "(0, 1]")  # strengths decay by this every span
    em_slots: int = ranged(64, "[1, 65536]")  # M: episodic slots (remembered tokens) per stream and WM block
    em_topk: int = ranged(4, "[1, 65536]")  # slots retrieved per query
    em_writes_per_span: int = ranged(2, "[1, 65536]")  # c: candidates per span, its most salient tokens
    # a candidate is written when its novelty (1 - max cos to the stored keys, about their mean) plus a
    # learned term exceeds this: near-copies of a stored key are not stored again
    em_novelty_threshold: float = ranged(0.02, "[-2, 2]")
    em_decay: float = ranged(0.999, "(0, 1]")  # strengths decay by this every span
    em_strength_max: float = ranged(1.0, "(0, 1000]")
    # what a full memory replaces: the entry with the lowest strength x em_age_decay ** (spans since it was
    # written); 1 = the weakest. Below 1, old entries give way to new ones of like strength (a salience that is
    # the same for every token of a kind would otherwise keep whichever happened to score highest, for good)
    em_age_decay: float = ranged(1.0, "(0, 1]")
    # weight of the salience head's own loss: predict the attention a token receives from later
    # queries of its window (what is looked up is worth remembering); 0: trained by reads alone
    em_salience_weight: float = ranged(1.0, "[0, 1000]")
    # how the episodic memory is read: "attention", by the WM attention as extra keys of its window (its
    # in-window lookup extended); "own", by a lookup of its own (a token remembered under the token before
    # it, its own softmax and output projection: episodic.py), for a backbone whose lookup is not in its
    # attention (in the MQAR bench the Spike-KDA state does it)
    em_keys: Literal["attention", "own"] = "attention"

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
        """Checks across fields: (key, problem) pairs, empty when consistent. (Each field's own
        range is on the field, checked by the preset validator.)"""
        problems = []
        if self.n_heads < 1 or self.kv_heads < 1:  # out of its range (reported there); no division by it
            return []
        if self.d_model % self.n_heads:
            problems.append(("d_model", f"must be divisible by n_heads ({self.n_heads})"))
        if self.n_heads % self.kv_heads:
            problems.append(("n_kv_heads", f"must divide n_heads ({self.n_heads})"))
        if self.em_topk > self.em_slots:
            problems.append(("em_topk", f"must be at most em_slots ({self.em_slots})"))
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
    training loss: total = CE + sum(weight_i * aux_i). `presets.schema.AuxiliaryConfig`
    inherits these fields, so they are keys of a preset's `auxiliary` section.
    """
    # policy head: next-token distribution from an internal layer, KL to the (detached) LM head
    policy_kl_weight: float = ranged(0.0, "[0, 100]")
    policy_layer: int = ranged(-1, "[-1, 512]")  # blocks below the policy head (its input is block policy_layer-1's output); -1 = n_layers // 2
    policy_token_fraction: float = ranged(0.25, "(0, 1]")  # share of positions the KL is computed on (a full-vocab matmul each)
    # value head: mean NLL of the next value_horizon tokens (detached LM logits), Huber regression
    value_weight: float = ranged(0.0, "[0, 100]")
    value_horizon: int = ranged(8, "[1, 65536]")
    # dynamics module: (final hidden, next token embedding) -> final hidden one step ahead, chained
    dynamics_weight: float = ranged(0.0, "[0, 100]")
    dynamics_steps: int = ranged(1, "[1, 3]")  # k: chained prediction steps (1-3)
    dynamics_loss: Literal["cosine", "mse"] = "cosine"
    # span contrastive: InfoNCE between a masked span's predicted and true representation
    span_contrastive_weight: float = ranged(0.0, "[0, 100]")
    span_mask_fraction: float = ranged(0.15, "(0, 1)")  # span length = round(fraction * sequence length), one span per sequence
    span_temperature: float = ranged(0.1, "(0, 100]")
    span_l2_normalize: bool = True
    span_right_context: bool = False  # let the predictor also see hidden states after the span (they attended to it)

    def check_heads(self, n_layers: Optional[int] = None) -> list[tuple[str, str]]:
        """Checks across fields: (key, problem) pairs, empty when consistent. (Each field's own
        range is on the field, checked by the preset validator.)"""
        problems = []
        if n_layers is not None and self.policy_kl_weight > 0 and not (
                self.policy_layer == -1 or 1 <= self.policy_layer <= n_layers):
            problems.append(("policy_layer", f"must be -1 or in [1, n_layers] (n_layers = {n_layers})"))
        return problems
