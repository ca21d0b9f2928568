"""The baseline: a GPT-style decoder (pre-norm RMSNorm, RoPE, causal SDPA, SwiGLU,
tied embeddings). It is the side-by-side reference for quality and speed."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .aux_heads import AuxHeads
from .base import ModelOutput
from .config import AuxHeadsConfig, ModelConfig
from .layers import RMSNorm, SwiGLU


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float):
    """cos, sin of shape [T, head_dim/2] for the given positions [T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x: [B, H, T, D] by angles [T, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with grouped KV heads. x: [B, T, d] -> [B, T, d]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        start = cache["pos"] if cache is not None else 0
        cos, sin = rope_tables(self.head_dim, torch.arange(start, start + T, device=x.device), self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # incremental decoding: attend to everything cached so far
            if cache.get("k") is not None:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if T == 1:
            causal = False  # one query sees every cached key
        elif k.shape[2] == T:
            causal = True
        else:  # a multi-token chunk after a cache: build the offset causal mask explicitly
            causal = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=causal if isinstance(causal, torch.Tensor) else None,
            is_causal=causal is True,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.n_heads,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, cfg.dropout)

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class TransformerLM(nn.Module):
    """tokens [B, T] -> ModelOutput(logits [B, T, V], state, aux). Keeps no state across
    training steps; `generation_state` gives it a KV cache for decoding.

    aux: in training mode, the auxiliary heads' "loss/...", "metric/aux/..." and
    "signal/surprise" entries (`aux_heads.py`); empty otherwise or when every head is off.
    """

    carries_state = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, aux_cfg: Optional[AuxHeadsConfig] = None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.apply(self._init)
        # GPT-2 style: residual projections scaled down by depth so the stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))
        # built last, with their own init; None when every head is off (then no parameters)
        self.aux_heads = AuxHeads.build(aux_cfg, cfg, vocab_size)

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)

    def generation_state(self, batch_size: int, device) -> dict:
        return {"pos": 0, "layers": [{"pos": 0} for _ in self.blocks]}

    def forward(self, tokens: torch.Tensor, state=None, reset_mask=None) -> ModelOutput:
        heads = self.aux_heads if self.training else None
        tap = heads.tap_layer if heads is not None else None
        x, mid = self.drop(self.embed(tokens)), None
        for i, block in enumerate(self.blocks):
            x = block(x, state["layers"][i] if state is not None else None)
            if i == tap:
                mid = x  # the policy head's input
        if state is not None:
            state["pos"] += tokens.shape[1]
            for layer in state["layers"]:
                layer["pos"] = state["pos"]
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        aux = heads(tokens, hidden, logits, self.embed.weight, mid) if heads is not None else {}
        return ModelOutput(logits, state, aux)
