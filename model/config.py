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
    lif_init_rate: float = 0.3  # spike rate the LIF drive bias is set for at init
    lif_surrogate_slope: float = 5.0  # fast-sigmoid surrogate: 1 / (1 + slope * |v - threshold|)^2

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
        if self.d_model % self.n_heads:
            problems.append(("d_model", f"must be divisible by n_heads ({self.n_heads})"))
        if self.n_heads % self.kv_heads:
            problems.append(("n_kv_heads", f"must divide n_heads ({self.n_heads})"))
        for key in ("d_model", "n_layers", "n_heads", "global_every", "chunk_size"):
            if getattr(self, key) < 1:
                problems.append((key, "must be at least 1"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", "must be in [0, 1)"))
        return problems
