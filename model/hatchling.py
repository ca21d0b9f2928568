"""Hatchling: the neuromorphic hybrid language model.

A pre-norm (RMSNorm) stack with tied input/output embeddings. Most blocks mix tokens
with Spike-KDA (spike-gated delta-rule fast weights, `spike_kda.py`); every
`global_every`-th block (layer i with (i + 1) % global_every == 0) uses working-memory
softmax attention over a sliding window (`wm_attention.py`). Every block ends with a
SwiGLU MLP.

State (batch first throughout): {"layers": [per-layer state]}, where a Spike-KDA layer
holds {"S", "membrane", "conv"} and a WM layer {"k", "v", "valid"}; a None state (or a
None entry) means zeros. `reset_mask` [B, T] resets one stream's state at the first
token of its new document, in every layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .base import ModelOutput
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .spike_kda import SpikeKDA
from .wm_attention import WorkingMemoryAttention


def is_wm_layer(cfg: ModelConfig, i: int) -> bool:
    """Whether layer i (0-based) is a working-memory attention layer."""
    return (i + 1) % cfg.global_every == 0


class HatchlingBlock(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm(x)). x: [B, T, d] -> ([B, T, d], state, spikes|None)."""

    def __init__(self, cfg: ModelConfig, wm: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = WorkingMemoryAttention(cfg) if wm else SpikeKDA(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, state=None, reset=None):
        spikes = None
        if isinstance(self.mixer, SpikeKDA):
            y, new_state, spikes = self.mixer(self.norm1(x), state, reset)
        else:
            y, new_state = self.mixer(self.norm1(x), state, reset)
        x = x + self.drop(y)
        return x + self.mlp(self.norm2(x)), new_state, spikes


class HatchlingLM(nn.Module):
    """tokens [B, T] -> ModelOutput(logits [B, T, V], state, aux).

    aux: "metric/spike_rate/layer{i}" (0-dim, detached) for every Spike-KDA layer i.
    """

    carries_state = True

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(HatchlingBlock(cfg, is_wm_layer(cfg, i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.apply(self._init)
        for block in self.blocks:
            # GPT-2 style: projections into the residual stream scaled down by depth
            for p in (block.mixer.out_proj.weight, block.mlp.down.weight):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))
            if isinstance(block.mixer, SpikeKDA):
                block.mixer.init_special()

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def generation_state(self, batch_size: int, device) -> dict:
        """A zero state: forward(prompt, state) then forward(one token, state) decodes."""
        return {"layers": [b.mixer.zero_state(batch_size, device) for b in self.blocks]}

    def forward(self, tokens: torch.Tensor, state=None, reset_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        layer_states = state["layers"] if state is not None else [None] * len(self.blocks)
        x = self.drop(self.embed(tokens))
        new_states, aux = [], {}
        for i, block in enumerate(self.blocks):
            x, layer_state, spikes = block(x, layer_states[i], reset_mask)
            new_states.append(layer_state)
            if spikes is not None:
                aux[f"metric/spike_rate/layer{i}"] = spikes.detach().mean()
        return ModelOutput(self.lm_head(self.norm(x)), {"layers": new_states}, aux)
