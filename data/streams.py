"""Packing documents into persistent parallel streams.

B streams, each an endless run of documents joined by the end-of-text token. Every step
takes the next T+1 tokens of every stream ([B, T+1]: inputs are [:, :-1], targets
[:, 1:]) and advances by T, so the last token of one window is the first input of the
next, nothing is dropped, and a recurrent model's state carries from step to step.
Each token also carries the index of the source it came from (per-source loss)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch


class DocumentStream(Protocol):
    """Anything that hands out (source index, Document): a DocumentMixer, or a
    background prefetcher wrapped around one."""

    def next_document(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T+1] int64
    sources: torch.Tensor  # [B, T+1] int64, source index of each token
    reset: torch.Tensor  # [B, T] bool, True where input token t starts a new document


def reset_mask(inputs: torch.Tensor, eot_id: int, first: torch.Tensor) -> torch.Tensor:
    """[B, T] bool, True where input token t starts a new document: it follows an
    end-of-text, or (t = 0) `first` [B] says the stream's previous window ended with one."""
    reset = torch.zeros_like(inputs, dtype=torch.bool)
    reset[:, 1:] = inputs[:, :-1] == eot_id
    reset[:, 0] = first
    return reset


class PackedStreams:
    """B persistent token streams over one document stream.

    encode: list[str] -> list[list[int]] (batched, so the Rust tokenizer runs in parallel).
    The stream buffers plus the document stream's position are the whole state: saving
    them makes a restarted run produce exactly the same next batch.
    """

    def __init__(self, documents: DocumentStream, encode: Callable[[list[str]], list[list[int]]],
                 eot_id: int, batch_size: int, seq_length: int, refill_docs: int = 16):
        self.documents, self.encode, self.eot = documents, encode, eot_id
        self.B, self.T, self.refill_docs = batch_size, seq_length, refill_docs
        self.buffers: list[list[int]] = [[] for _ in range(batch_size)]
        self.buffer_sources: list[list[int]] = [[] for _ in range(batch_size)]
        # the first input token of every stream starts a document (nothing precedes it)
        self.starts_doc = [True] * batch_size
        self.pending: list[tuple[int, list[int]]] = []  # tokenised documents not yet placed

    def _next_tokens(self) -> tuple[int, list[int]]:
        if not self.pending:
            picked = [self.documents.next_document() for _ in range(self.refill_docs)]
            # documents tokenised by a background worker carry their ids (data/prefetch.py)
            encoded = [getattr(doc, "ids", None) for _, doc in picked]
            todo = [k for k, ids in enumerate(encoded) if ids is None]
            if todo:
                for k, ids in zip(todo, self.encode([picked[k][1].text for k in todo])):
                    encoded[k] = ids
            self.pending = [(src, ids + [self.eot]) for (src, _), ids in zip(picked, encoded)][::-1]
        return self.pending.pop()

    def next_batch(self) -> Batch:
        need = self.T + 1
        tokens = torch.empty(self.B, need, dtype=torch.long)
        sources = torch.empty(self.B, need, dtype=torch.long)
        for b in range(self.B):
            buf, srcs = self.buffers[b], self.buffer_sources[b]
            while len(buf) < need:
                src, ids = self._next_tokens()
                buf.extend(ids)
                srcs.extend([src] * len(ids))
            tokens[b] = torch.tensor(buf[:need])
            sources[b] = torch.tensor(srcs[:need])
            del buf[: self.T], srcs[: self.T]  # keep the last token: next window's first input
        inputs = tokens[:, :-1]
        reset = reset_mask(inputs, self.eot, torch.tensor(self.starts_doc))
        self.starts_doc = (inputs[:, -1] == self.eot).tolist()
        return Batch(tokens, sources, reset)

    def state_dict(self) -> dict:
        return {"buffers": [list(b) for b in self.buffers], "buffer_sources": [list(s) for s in self.buffer_sources],
                "starts_doc": list(self.starts_doc), "pending": [(s, list(ids)) for s, ids in self.pending],
                "documents": self.documents.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = [list(b) for b in state["buffers"]]
        self.buffer_sources = [list(s) for s in state["buffer_sources"]]
        self.starts_doc = list(state["starts_doc"])
        self.pending = [(s, list(ids)) for s, ids in state["pending"]]
        self.documents.load_state_dict(state["documents"])


def eval_windows(docs_tokens: Iterator[list[int]], eot_id: int, batch_size: int, seq_length: int,
                 max_tokens: int) -> list[torch.Tensor]:
    """Held-out documents packed the same way into a fixed list of [B, T+1] windows
    (consecutive windows of a stream follow each other, so recurrent state can carry).
    At most `max_tokens` predicted tokens in all; fewer if the held-out text is short."""
    flat: list[int] = []
    for ids in docs_tokens:
        flat.extend(ids + [eot_id])
    steps = min(max_tokens // (batch_size * seq_length), (len(flat) - 1) // (batch_size * seq_length))
    if steps == 0:  # too little held-out text for the full batch: use fewer streams
        batch_size = max(1, (len(flat) - 1) // seq_length)
        steps = min(1, (len(flat) - 1) // (batch_size * seq_length))
    if steps == 0:
        return []
    per_stream = steps * seq_length
    streams = torch.tensor(flat[: batch_size * per_stream + 1])
    windows = []
    for s in range(steps):
        rows = [streams[b * per_stream + s * seq_length: b * per_stream + (s + 1) * seq_length + 1] for b in range(batch_size)]
        windows.append(torch.stack(rows))
    return windows
