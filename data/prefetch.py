"""Background document workers: reading, filtering and tokenising off the training loop.

`PrefetchingStream` has the DocumentMixer interface (next_document, state_dict,
load_state_dict, set_weights). It runs W worker processes; worker w on rank r owns shard
r*W + w of world*W, reads it through its own DocumentMixer, optionally tokenises each
document (the ids ride along as `doc.ids`, which PackedStreams uses instead of encoding
again), and sends documents ahead over a pipe.

Determinism (exact restarts):
- documents are taken from the workers strictly in turn (0, 1, ..., W-1, 0, ...);
- every document arrives with its worker's mixer state as of just after it, and the
  consumer keeps the state of the last document it took from each worker: that, the
  turn, and the pending weight changes are the whole state_dict; a restart relaunches
  each worker from its saved mixer state;
- a worker may run at most `prefetch` documents ahead (credit-based flow control), and a
  weight change from set_weights is applied by worker w at a fixed document index,
  (documents consumed from w) + prefetch, that no worker can have reached yet. Weight
  changes therefore take effect `prefetch` documents per worker later than in the
  in-process mixer, but at the same place in every run and after every restart.

Workers are daemon processes (they die with the trainer) started with the
"forkserver" method where available (a clean server process forks them: no inherited
threads or CUDA state, and the heavy imports are paid once), else "spawn". As with any
multiprocessing start method other than fork, the training script's entry point must be
guarded by `if __name__ == "__main__":`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback
import weakref
from collections import deque
from typing import Callable, Optional, Sequence

from .config import DataConfig
from .registry import AllSourcesDied, DocumentMixer
from .sources.base import Document, Source

_CREDIT_CHUNK = 8  # credits go back to a worker in batches of up to this many documents
_WORKER_BATCH = 16  # documents a worker prepares (and tokenises together) per message
_POLL_S = 1.0  # how often a waiting consumer checks that its worker is still alive


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def _worker_main(w: int, sources: list[Source], cfg: DataConfig, shard: int, num_shards: int,
                 tokenizer_json: Optional[str], tokenizer_spec: Optional[dict], state: Optional[dict],
                 base_index: int, credits: int, schedule: list, cmd, out) -> None:
    """One background worker: its own DocumentMixer over shard `shard` of `num_shards`.

    Protocol (consumer -> worker over `cmd`): ("credit", n) allows n more documents;
    ("weights", at, weights) sets the mixer weights just before document index `at`;
    ("stop",). Worker -> consumer over `out`: ("docs", [(src, text, source, doc_id, ids,
    state), ...]) or ("error", kind, message, failures)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # W workers already run in parallel
    try:
        mixer = DocumentMixer(sources, cfg, shard=shard, num_shards=num_shards)
        if state is not None:
            mixer.load_state_dict(state)
        tokenizer = None
        if tokenizer_json is not None:
            from .tokenizer import TextTokenizer

            tokenizer = TextTokenizer.from_json(tokenizer_json, tokenizer_spec or {})
        produced, granted = base_index, base_index + credits
        schedule = sorted((int(at), list(wts)) for at, wts in schedule)

        def handle(msg) -> bool:
            nonlocal granted
            if msg[0] == "credit":
                granted += msg[1]
            elif msg[0] == "weights":
                schedule.append((int(msg[1]), list(msg[2])))
                schedule.sort(key=lambda x: x[0])
            elif msg[0] == "stop":
                return False
            return True

        while True:
            while cmd.poll(0) if produced < granted else True:  # block only when out of credit
                if not handle(cmd.recv()):
                    return
            batch = []
            while produced < granted and len(batch) < _WORKER_BATCH:
                while schedule and schedule[0][0] <= produced:
                    mixer.set_weights(schedule.pop(0)[1])
                src, doc = mixer.next_document()
                batch.append([src, doc.text, doc.source, doc.doc_id, None, mixer.state_dict()])
                produced += 1
            if tokenizer is not None:
                for item, ids in zip(batch, tokenizer.encode_batch([item[1] for item in batch])):
                    item[4] = ids
            out.send(("docs", batch))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the consumer went away
    except BaseException as e:  # report, then exit: the consumer raises it in the trainer
        failures = e.failures if isinstance(e, AllSourcesDied) else None
        try:
            out.send(("error", e.__class__.__name__, "".join(traceback.format_exception(e)), failures))
        except Exception:
            pass


class PrefetchingStream:
    """DocumentMixer-compatible stream fed by `num_workers` background processes."""

    def __init__(self, sources: list[Source], cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 num_workers: Optional[int] = None, tokenizer=None, prefetch: Optional[int] = None,
                 start_method: Optional[str] = None):
        self.sources, self.cfg = sources, cfg
        self.rank, self.world_size = rank, world_size
        self.W = num_workers if num_workers is not None else cfg.num_workers
        if self.W < 1:
            raise ValueError("PrefetchingStream needs num_workers >= 1 (use DocumentMixer for 0)")
        self.prefetch = max(1, prefetch if prefetch is not None else cfg.prefetch_docs)
        # credits go back in batches, but never so late that a worker could stall
        self._credit_chunk = max(1, min(_CREDIT_CHUNK, self.prefetch // 2))
        self.tokenizer_json = tokenizer.to_json() if tokenizer is not None else None
        self.tokenizer_spec = dict(tokenizer.spec) if tokenizer is not None else None
        self.ctx = mp.get_context(start_method or _default_start_method())
        if self.ctx.get_start_method() == "forkserver":
            self.ctx.set_forkserver_preload([__name__])  # the server imports us (and torch) once
        self.turn = 0
        self.consumed = [0] * self.W  # documents taken from each worker, ever (across restarts)
        self.states: list[Optional[dict]] = [None] * self.W  # mixer state after that last document
        self.pending: list[list] = [[] for _ in range(self.W)]  # [at, weights] not yet reached
        self._procs: Optional[list] = None
        self._finalizer = None

    # -- worker lifecycle ---------------------------------------------------------------
    def shard_of(self, w: int) -> int:
        return self.rank * self.W + w

    def _start(self) -> None:
        self._procs, self._cmds, self._outs = [], [], []
        self._buffers = [deque() for _ in range(self.W)]
        self._unsent = [0] * self.W
        for w in range(self.W):
            cmd_recv, cmd_send = self.ctx.Pipe(duplex=False)
            out_recv, out_send = self.ctx.Pipe(duplex=False)
            proc = self.ctx.Process(
                target=_worker_main, name=f"data-worker-r{self.rank}w{w}", daemon=True,
                args=(w, self.sources, self.cfg, self.shard_of(w), self.world_size * self.W,
                      self.tokenizer_json, self.tokenizer_spec, self.states[w], self.consumed[w],
                      self.prefetch, list(self.pending[w]), cmd_recv, out_send))
            proc.start()
            cmd_recv.close()  # the child holds its ends now; closing ours lets EOF propagate
            out_send.close()
            self._procs.append(proc)
            self._cmds.append(cmd_send)
            self._outs.append(out_recv)
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._cmds, self._outs)

    def close(self) -> None:
        """Stop the workers (idempotent). The stream can be used again: it restarts them
        from the current state."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._procs = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- consuming ----------------------------------------------------------------------
    def _receive(self, w: int) -> None:
        conn, proc = self._outs[w], self._procs[w]
        while not conn.poll(_POLL_S):
            if not proc.is_alive():
                code = proc.exitcode
                self.close()
                raise RuntimeError(f"data worker {w} (rank {self.rank}) exited unexpectedly (exit code {code})")
        try:
            msg = conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"data worker {w} (rank {self.rank}) closed its pipe unexpectedly") from None
        if msg[0] == "error":
            _, kind, text, failures = msg
            self.close()
            if failures is not None:
                raise AllSourcesDied([tuple(f) for f in failures])
            raise RuntimeError(f"data worker {w} (rank {self.rank}) failed with {kind}:\n{text}")
        for src, text, source, doc_id, ids, state in msg[1]:
            doc = Document(text, source, doc_id)
            if ids is not None:
                doc.ids = ids  # tokenised in the worker: PackedStreams uses these
            self._buffers[w].append((src, doc, state))

    def next_document(self) -> tuple[int, Document]:
        if self._procs is None:
            self._start()
        w = self.turn
        while not self._buffers[w]:
            self._receive(w)
        src, doc, state = self._buffers[w].popleft()
        self.states[w] = state
        self.consumed[w] += 1
        self.pending[w] = [p for p in self.pending[w] if p[0] >= self.consumed[w]]
        self._unsent[w] += 1
        if self._unsent[w] >= self._credit_chunk:
            self._cmds[w].send(("credit", self._unsent[w]))
            self._unsent[w] = 0
        self.turn = (w + 1) % self.W
        return src, doc

    def __iter__(self):
        while True:
            yield self.next_document()

    def set_weights(self, weights: Sequence[float]) -> None:
        """New drawing weights for every worker's mixer (switching it to weighted), from
        each worker's document index consumed + prefetch on."""
        if len(weights) != len(self.sources):
            raise ValueError(f"{len(weights)} weights for {len(self.sources)} sources")
        weights = [float(x) for x in weights]
        for w in range(self.W):
            at = self.consumed[w] + self.prefetch  # beyond anything the worker may have made
            self.pending[w].append([at, weights])
            if self._procs is not None:
                self._cmds[w].send(("weights", at, weights))

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"num_workers": self.W, "rank": self.rank, "world_size": self.world_size, "turn": self.turn,
                "consumed": list(self.consumed), "workers": list(self.states),
                "pending": [[[at, list(wts)] for at, wts in p] for p in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_workers") != self.W or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(
                f"data stream state was saved with {state.get('num_workers')} workers x "
                f"{state.get('world_size')} ranks; this run has {self.W} x {self.world_size}. "
                "Resume with the same data.num_workers and world size for an exact restart.")
        self.close()
        self.turn = int(state["turn"])
        self.consumed = [int(c) for c in state["consumed"]]
        self.states = list(state["workers"])
        self.pending = [[[int(at), list(wts)] for at, wts in p] for p in state["pending"]]


def _shutdown(procs, cmds, outs) -> None:
    """Ask each worker to stop, then make sure it has (terminate/kill stragglers)."""
    for conn in cmds:
        try:
            conn.send(("stop",))
        except (OSError, ValueError):
            pass
    for conn in cmds + outs:  # closing our ends wakes a worker blocked on a full pipe
        try:
            conn.close()
        except OSError:
            pass
    for proc in procs:
        proc.join(timeout=2)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=1)


def make_document_stream(sources: list[Source], cfg: DataConfig, rank: int = 0, world_size: int = 1,
                         tokenizer=None, log: Optional[Callable[[str], None]] = None):
    """The document stream a rank trains on: a DocumentMixer over shard `rank` of
    `world_size` when cfg.num_workers == 0 (tokenised by PackedStreams in-process), else a
    PrefetchingStream with cfg.num_workers workers on shards rank*W + w of world*W, which
    tokenise in the background when `tokenizer` (a TextTokenizer) is given. `log` receives
    the in-process mixer's retry/drop messages; workers report theirs through `logging`
    (stderr of the worker process)."""
    if cfg.num_workers <= 0:
        return DocumentMixer(sources, cfg, shard=rank, num_shards=world_size, log=log)
    return PrefetchingStream(sources, cfg, rank=rank, world_size=world_size, tokenizer=tokenizer)
