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

With episodic memory on (`episodic.py`), the tokens that scrolled out of the window and
were remembered join the softmax as extra keys (`attend(..., memory=...)`).
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
        self.query_block: Optional[int] = None  # queries per SDPA call; None: all, or W once T > 2W
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

    def project(self, x: torch.Tensor):
        """x [B, T, d] -> q [B, H, T, D], k, v [B, G, T, D]."""
        B, T, _ = x.shape
        H, G, D = self.n_heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, G * D, G * D], dim=-1)
        return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, G, D).transpose(1, 2),
                v.view(B, T, G, D).transpose(1, 2))

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, reset: Optional[torch.Tensor] = None):
        y, new_state, _ = self.attend(*self.project(x), state, reset)
        return y, new_state

    def _windowed(self, q, keys, values, mask, dropout: float, memory=None, scale=None) -> torch.Tensor:
        """Softmax attention of q [B, H, T, D] over keys/values [B, G, W+T, D] (cache first)
        under mask(s, e) (the [B, e - s, e - s + W] mask of queries s .. e-1 over keys s .. e+W-1).
        A query at t only reaches keys t .. t+W, so when the call is
        longer than two windows the queries go in blocks of W, each against its own W + W
        keys: O(T W) work instead of O(T (T + W)).

        memory: None, or (keys, values [B, G, E, D], mask [B, H, T, E] bool): entries every
        block also sees (after its window keys), each query those its mask allows, in the
        same softmax; the joint mask is built per block, [B, H, block, 2W + E]."""
        T, W, G, H = q.shape[2], self.window, keys.shape[1], q.shape[1]
        block = self.query_block or (T if T <= 2 * W else W)
        ys = []
        for s in range(0, T, block):
            e = min(s + block, T)
            k_blk, v_blk, m_blk = keys[:, :, s:e + W], values[:, :, s:e + W], mask(s, e)[:, None]
            if memory is not None:
                mem_k, mem_v, mem_mask = memory
                k_blk, v_blk = torch.cat([k_blk, mem_k], 2), torch.cat([v_blk, mem_v], 2)
                m_blk = torch.cat([m_blk.expand(-1, H, -1, -1), mem_mask[:, :, s:e]], -1)
            ys.append(F.scaled_dot_product_attention(q[:, :, s:e], k_blk, v_blk, attn_mask=m_blk,
                                                     dropout_p=dropout, scale=scale, enable_gqa=G != H))
        return ys[0] if len(ys) == 1 else torch.cat(ys, 2)

    def attend(self, q, k, v, state: Optional[dict] = None, reset: Optional[torch.Tensor] = None, memory=None):
        """q [B, H, T, D], k, v [B, G, T, D] (from `project`) -> (y [B, T, d], new state,
        memory share [B, H, T] or None).

        memory: None, or remembered keys from the block's episodic memory
        (`episodic.py`): (keys, values [B, G, E, D], log_strength [B, E], bias [H, T],
        mask [B, H, T, E] bool). Window and memory are one softmax (per query block, as
        without memory, so a long call stays O(T (W + E))): a remembered key j
        scores q.k_j / sqrt(D) + log_strength_j + bias[h, t], like a window key plus the
        log of its strength (so it counts strength times as much). The extra terms ride on
        two extra q/k dimensions, so one SDPA call with a boolean mask computes it and
        their gradients flow through the keys, not the mask. An extra value channel, 1 on
        remembered keys, returns each query's share of attention on the memory."""
        B, H, T, D = q.shape
        G, W = self.kv_heads, self.window
        if state is None:
            state = self.zero_state(B, q.device)
        keys = torch.cat([state["k"].to(k.dtype), k], dim=2)  # [B, G, W+T, D]; cache first
        values = torch.cat([state["v"].to(v.dtype), v], dim=2)

        valid = torch.cat([state["valid"], torch.ones(B, T, dtype=torch.bool, device=q.device)], dim=1)  # [B, W+T]
        seg_q = seg_k = None
        if reset is not None:  # same document only; cached keys are in this call's segment 0
            seg_q = reset.long().cumsum(1)  # [B, T]
            seg_k = F.pad(seg_q, (W, 0))  # [B, W+T]

        def mask(s: int, e: int) -> torch.Tensor:
            """[B, e - s, e - s + W] bool: which keys s .. e+W-1 (cache first) the queries s .. e-1
            see: causal, within the window, valid, and of the query's document."""
            delta = torch.arange(s, e, device=q.device)[:, None] - torch.arange(s - W, e, device=q.device)[None, :]
            m = ((delta >= 0) & (delta <= W))[None] & valid[:, None, s:e + W]
            if seg_q is not None:
                m = m & (seg_q[:, s:e, None] == seg_k[:, None, s:e + W])
            return m

        survives = valid if seg_q is None else valid & (seg_k == seg_q[:, -1:])  # into the next call
        # every query sees at least itself, so no row of the mask is empty
        dropout = self.dropout if self.training else 0.0
        share = None
        if memory is None:
            y = self._windowed(q, keys, values, mask, dropout)
        else:
            mem_k, mem_v, log_strength, bias, mem_mask = memory
            E, dt = mem_k.shape[2], q.dtype
            one = lambda *shape: torch.ones(*shape, 1, dtype=dt, device=q.device)  # noqa: E731
            zero = lambda *shape: torch.zeros(*shape, 1, dtype=dt, device=q.device)  # noqa: E731
            per_query = (bias.to(dt) * D ** 0.5)[None, :, :, None].expand(B, -1, -1, -1)  # [B, H, T, 1]
            per_key = log_strength.to(dt)[:, None, :, None].expand(-1, G, -1, -1)  # [B, G, E, 1]
            q_ext = torch.cat([q, one(B, H, T) * D ** 0.5, per_query], -1)
            k_win = torch.cat([keys, zero(B, G, W + T), zero(B, G, W + T)], -1)
            k_mem = torch.cat([mem_k.to(dt), per_key, one(B, G, E)], -1)
            # values padded to q/k's width: SDPA's fused CPU kernel wants them equal (2x faster)
            v_win = torch.cat([values, zero(B, G, W + T), zero(B, G, W + T)], -1)
            v_mem = torch.cat([mem_v.to(dt), one(B, G, E), zero(B, G, E)], -1)
            out = self._windowed(q_ext, k_win, v_win, mask, dropout, (k_mem, v_mem, mem_mask), scale=D ** -0.5)
            y, share = out[..., :D], out[..., D]
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, H * D))
        new_state = {"k": keys[:, :, T:], "v": values[:, :, T:], "valid": survives[:, T:]}
        return y, new_state, share
