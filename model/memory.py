"""What the two memories share: plasticity spans laid out on a grid, and the state helpers.

Procedural memory (`procedural.py`) commits and episodic memory (`episodic.py`) writes
only at the end of a *plasticity span* of P tokens, so between two span ends the memory
contents are constant. That makes every per-token operation a batched matmul over a
span, and leaves a Python loop over spans (T / P iterations) for the commits only.

Spans are aligned to absolute stream positions: span s covers stream positions
[s P, (s + 1) P). The model keeps a token clock in its state, so a call of T tokens
that starts at stream position `clock` (offset o = clock mod P) is laid on a grid of
`n` spans x P cells: token t sits in cell o + t; the o cells before it (tokens seen by
an earlier call) and the cells after the last token are padding. Because the layout
depends only on absolute positions, cutting a stream into calls differently (any T,
including T = 1 for decoding) gives the same commits at the same tokens.

Document resets inside a span are per stream and per cell (`SpanGrid` masks below).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


class SpanGrid:
    """The layout of one call's T tokens on plasticity spans of P cells.

    offset: clock mod P, the span position of the call's first token.
    reset:  [B, T] bool or None, True at the first token of a new document.

    Attributes (n = number of spans the call touches):
      n, P, offset, T
      complete:  list[bool] [n]: span s ends inside this call (a commit/write happens there)
      length:    list[int] [n]: tokens of this call in span s
      valid:     [n, P] bool, real (non-padding) cells
      reset:     [B, n, P] bool or None (None: no document starts anywhere in the call)
      has_reset: [B, n] bool or None: a document starts in span s of stream b
      since_reset: [B, n, P] bool or None: a reset at or before this cell in its span
                 (with hard resets, the committed memory is gone for these cells)
      current:   [B, n, P] bool: real cells whose token belongs to the document the stream
                 is in at the end of the span (no reset after it in the span)
    """

    def __init__(self, T: int, P: int, offset: int, reset: Optional[torch.Tensor], device):
        self.T, self.P, self.offset = T, P, offset
        self.n = math.ceil((offset + T) / P)
        self.complete = [(s + 1) * P <= offset + T for s in range(self.n)]
        self.length = [min((s + 1) * P, offset + T) - max(s * P, offset) for s in range(self.n)]
        cell = torch.arange(self.n * P, device=device)
        self.valid = ((cell >= offset) & (cell < offset + T)).view(self.n, P)
        self._decay: dict[float, torch.Tensor] = {}
        self.reset = self.has_reset = self.since_reset = None
        self.current = self.valid[None]
        if reset is not None and bool(reset.any()):
            self.reset = self.to_grid(reset.bool())  # [B, n, P]
            count = self.reset.long().cumsum(-1)
            self.since_reset = count > 0
            self.has_reset = count[..., -1] > 0
            self.current = self.valid & (count == count[..., -1:])

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, *rest] -> [B, n, P, *rest], zero (False) in the padding cells."""
        B, T = x.shape[:2]
        rest = x.shape[2:]
        pad_back = self.n * self.P - self.offset - T
        flat = x.reshape(B, T, -1)
        flat = F.pad(flat.transpose(1, 2), (self.offset, pad_back)).transpose(1, 2)
        return flat.reshape(B, self.n, self.P, *rest)

    def from_grid(self, y: torch.Tensor) -> torch.Tensor:
        """[B, n, P, *rest] -> [B, T, *rest] (drops the padding cells)."""
        return y.flatten(1, 2)[:, self.offset:self.offset + self.T]

    def keep(self, s: int) -> Optional[torch.Tensor]:
        """[B] float: 1 for streams with no document start in span s (what they carry into
        it survives), 0 for the others; None when the call has no resets."""
        return None if self.has_reset is None else (~self.has_reset[:, s]).float()

    def decay_weights(self, rho: float) -> torch.Tensor:
        """[n, P]: rho ** (tokens from this cell to the last real cell of its span), 0 in padding.
        A trace that gains c_t at every token and decays by rho per token ends its span at
        sum_t weight_t c_t plus rho ** length times what it carried in."""
        if rho not in self._decay:  # every block asks for the same rho: compute it once per call
            # the last real cell of span s is offset + T - 1 for the call's last span, else P - 1
            last = torch.full((self.n, 1), self.P - 1, device=self.valid.device)
            last[-1] = (self.offset + self.T - 1) % self.P
            dist = (last - torch.arange(self.P, device=self.valid.device)).clamp(min=0)
            self._decay[rho] = torch.where(self.valid, rho ** dist.float(), torch.zeros((), device=self.valid.device))
        return self._decay[rho]


def keep_streams(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, ...] with the streams where keep [B] is 0 zeroed (no-op for keep None)."""
    return x if keep is None else x * keep.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def committed(state: Optional[dict], names: tuple[str, ...]) -> dict:
    """The committed-contents part of a memory's state, detached copies."""
    return {k: state[k].detach().clone() for k in names} if state is not None else {}
