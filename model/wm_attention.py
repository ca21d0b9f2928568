"""Working-memory (WM) attention: causal softmax attention with no positional encoding
(NoPE) and grouped KV heads over a sliding window of the stream.

Each query at stream position p attends to the keys at positions p - W .. p (itself and
the W tokens before it, W = cfg.wm_window) that belong to the same document. Keys from
earlier steps come from a cache that is part of the recurrent state, so the window is
the same however the stream is cut into training steps or decoding calls: a full
forward and an incremental one see exactly the same context.

State (batch first): {"k": [B, kvH, W, hd], "v": [B, kvH, W, hd], "valid": [B, W] bool}.
The cache holds the last W keys/values of the stream; `valid` is False for empty slots
and for keys of an earlier document (cleared when the stream's reset is seen).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class WorkingMemoryAttention(nn.Module):
    """x: [B, T, d] -> ([B, T, d], new state)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.window = cfg.wm_window
        self.dropout = cfg.dropout
        self.qkv_proj = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def zero_state(self, batch_size: int, device) -> dict:
        shape = (batch_size, self.kv_heads, self.window, self.head_dim)
        return {
            "k": torch.zeros(shape, device=device),
            "v": torch.zeros(shape, device=device),
            "valid": torch.zeros(batch_size, self.window, dtype=torch.bool, device=device),
        }

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, reset: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        H, G, D, W = self.n_heads, self.kv_heads, self.head_dim, self.window
        q, k, v = self.qkv_proj(x).split([H * D, G * D, G * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, G, D).transpose(1, 2)
        v = v.view(B, T, G, D).transpose(1, 2)
        if state is None:
            state = self.zero_state(B, x.device)
        keys = torch.cat([state["k"].to(k.dtype), k], dim=2)  # [B, G, W+T, D]; cache first
        values = torch.cat([state["v"].to(v.dtype), v], dim=2)

        # positions relative to this call's first token: cache slots are -W .. -1
        pos_q = torch.arange(T, device=x.device)
        pos_k = torch.arange(-W, T, device=x.device)
        delta = pos_q[:, None] - pos_k[None, :]
        mask = ((delta >= 0) & (delta <= W))[None]  # [1, T, W+T]: causal, within the window
        valid = torch.cat([state["valid"], torch.ones(B, T, dtype=torch.bool, device=x.device)], dim=1)
        mask = mask & valid[:, None, :]
        if reset is not None:  # same document only; cached keys are in this call's segment 0
            seg_q = reset.long().cumsum(1)  # [B, T]
            seg_k = F.pad(seg_q, (W, 0))  # [B, W+T]
            mask = mask & (seg_q[:, :, None] == seg_k[:, None, :])
            valid = valid & (seg_k == seg_q[:, -1:])  # what survives into the next call
        # every query sees at least itself, so no row of the mask is empty
        y = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None],
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=G != H,
        )
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, H * D))
        new_state = {"k": keys[:, :, T:], "v": values[:, :, T:], "valid": valid[:, T:]}
        return y, new_state
