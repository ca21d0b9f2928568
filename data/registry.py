"""The data registry: turns the preset's `data.sources` into opened Source plugins,
splits held-out documents off by a hash of their id, filters and de-duplicates, and
mixes the training documents of every source into one ordered stream."""
from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from .config import DataConfig, HFSourceSpec, PdfSourceSpec, TextSourceSpec
from .sharding import file_shares  # noqa: F401  (re-exported: part of the registry's surface)
from .sources.base import Document, Source, SourceError

_log = logging.getLogger(__name__)
_TABLE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "owner/name" that is not a local path


class AllSourcesFailed(Exception):
    """No source could be opened. `failures` is a list of (source name, reason)."""

    def __init__(self, failures: list[tuple[str, str]]):
        self.failures = failures
        lines = "\n".join(f"  - {name}: {reason}" for name, reason in failures)
        super().__init__(f"no data source could be opened:\n{lines}")


class AllSourcesDied(RuntimeError):
    """Every source of a mixer failed mid-run (after its retries). `failures`: (name, reason)."""

    def __init__(self, failures: list[tuple[str, str]]):
        self.failures = failures
        lines = "\n".join(f"  - {name}: {reason}" for name, reason in failures)
        super().__init__(f"every data source failed during the run:\n{lines}")


def make_source(spec) -> Source:
    """The Source plugin for one entry of `data.sources`. A bare string is a built-in
    name, a PDF file or folder of PDFs, a .jsonl/.json/.parquet/.csv file (read as an `hf`
    source with text_field "text"), a hub id "owner/name" that is not a local path, or
    else a text file or folder."""
    if isinstance(spec, str):
        from .sources.builtin import BUILTIN_DATASETS, builtin_spec

        if spec in BUILTIN_DATASETS:
            return make_source(builtin_spec(spec))
        path = Path(spec)
        if path.suffix.lower() == ".pdf" or (path.is_dir() and any(path.rglob("*.pdf")) and not any(path.rglob("*.txt"))):
            spec = PdfSourceSpec(type="pdf", path=spec)
        elif path.suffix.lower() in _TABLE_SUFFIXES or (not Path(spec.split("/")[0]).exists() and _HUB_ID.fullmatch(spec)):
            spec = HFSourceSpec(type="hf", dataset=spec)  # a .jsonl/.parquet/.csv file, or "owner/name"
        else:
            spec = TextSourceSpec(type="text", path=spec)
    if isinstance(spec, TextSourceSpec):
        from .sources.text import TextSource

        return TextSource(spec.path, spec.name, spec.extensions, spec.chunk_chars)
    if isinstance(spec, HFSourceSpec):
        from .sources.hf import HFSource

        return HFSource(spec)
    if isinstance(spec, PdfSourceSpec):
        from .sources.pdf import PdfSource

        return PdfSource(spec)
    raise TypeError(f"not a source spec: {spec!r}")


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Deterministic held-out membership from a hash of the document id."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def text_key(text: str) -> bytes:
    """Hash of whitespace-normalised text, for cheap exact-duplicate detection."""
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=12).digest()


def needs_hub(spec) -> bool:
    """Whether opening this entry of `data.sources` needs the Hugging Face hub (no I/O)."""
    return bool(getattr(make_source(spec), "needs_hub", lambda: False)())


def source_label(spec) -> str:
    """How a `data.sources` entry is named in messages (and, for most, its source's name)."""
    return str(spec if isinstance(spec, str) else (spec.name or getattr(spec, "dataset", None) or spec.path))


def open_sources(cfg: DataConfig, log: Callable[[str], None] = print) -> list[Source]:
    """Every source that opens; the others are reported with their reason and skipped.
    Raises AllSourcesFailed (listing each source and why) when none opens."""
    opened, failures = [], []
    for spec in cfg.sources:
        label = source_label(spec)
        try:
            source = make_source(spec)
            source.check()
        except Exception as e:  # SourceError carries the reason; anything else is reported too
            reason = str(e) if isinstance(e, SourceError) else f"{e.__class__.__name__}: {e}"
            failures.append((str(label), reason))
            log(f"[data] skipping source {label}: {reason}")
            continue
        opened.append(source)
    if not opened:
        raise AllSourcesFailed(failures or [("(none)", "data.sources is empty")])
    return opened


class DocumentMixer:
    """One ordered stream of training documents drawn from several sources.

    Each source is read endlessly (epoch after epoch), filtered (held-out split, minimum
    length, duplicates within an epoch) and drawn by `strategy`:
    round_robin takes one document from each source in turn; sequential reads each source
    through once before the next; weighted draws a source at random by `weights`.
    `set_weights` (adaptive reweighting) switches the strategy to weighted: drawing by
    weight is the only strategy in which weights mean anything.

    A source whose reader raises mid-run (a network drop) is reopened at its position up to
    `cfg.source_retries` times, waiting `cfg.retry_backoff_s` * 2**k between tries; then it
    is dropped from the mix with a warning and the others go on. When every source is
    dropped, AllSourcesDied is raised. The retry count resets after each good document.

    `state_dict()` records how far each source has been read, so a restarted run replays
    to the same place without tokenising what it skips. A run resumed on another number
    of readers (data/reshard.py) starts each source's epoch with the ids of the documents
    the old readers had already taken in it (`skip`): they are passed over in that epoch.
    """

    def __init__(self, sources: list[Source], cfg: DataConfig, shard: int = 0, num_shards: int = 1,
                 log: Optional[Callable[[str], None]] = None):
        self.sources, self.cfg = sources, cfg
        self.shard, self.num_shards = shard, num_shards
        self.log = log or _log.warning
        self.strategy = cfg.mix_strategy
        weights = cfg.source_weights or [1.0] * len(sources)
        if len(weights) != len(sources):  # a source failed to open: keep the weights that apply
            weights = [1.0] * len(sources)
        self.weights = [float(w) for w in weights]
        self.rng = random.Random(cfg.seed * 1000003 + shard)
        self.epoch = [0] * len(sources)
        self.consumed = [0] * len(sources)  # training documents taken in the current epoch
        self.turn = 0  # round_robin / sequential pointer
        self.dead: dict[int, str] = {}  # dropped sources and why
        self._failures = [0] * len(sources)  # consecutive failures of each source
        self._iters: list[Optional[Iterator[Document]]] = [None] * len(sources)
        self.skip: list[set[str]] = [set() for _ in sources]  # doc ids passed over in epoch skip_epoch[i]
        self.skip_epoch = [-1] * len(sources)

    # -- per-source filtered iteration -------------------------------------------------
    def _filtered(self, i: int) -> Iterator[Document]:
        seen: set[bytes] = set()
        skip = self.skip[i] if self.skip_epoch[i] == self.epoch[i] else ()
        for doc in self.sources[i].documents(self.shard, self.num_shards):
            if doc.doc_id in skip:
                continue
            if len(doc.text.strip()) < self.cfg.min_text_length:
                continue
            if is_heldout(doc.doc_id, self.cfg.eval_fraction):
                continue
            if self.cfg.dedup:
                key = text_key(doc.text)
                if key in seen:
                    continue
                seen.add(key)
            yield doc

    def _read(self, i: int) -> Optional[Document]:
        """The next filtered document of source i's epoch, reopening at the saved position."""
        if self._iters[i] is None:
            it = self._filtered(i)
            for _ in range(self.consumed[i]):  # replay to the saved position
                if next(it, None) is None:
                    break
            self._iters[i] = it
        return next(self._iters[i], None)

    def _next_from(self, i: int) -> Optional[Document]:
        """The next document of source i, or None when its current epoch is exhausted or
        the source has just been dropped."""
        while True:
            try:
                doc = self._read(i)
                break
            except Exception as e:  # the source died under us: retry from its position, then drop
                self._iters[i] = None
                self._failures[i] += 1
                reason = f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}"
                if self._failures[i] > self.cfg.source_retries:
                    self._drop(i, f"failed {self._failures[i]} times, last: {reason}")
                    return None
                delay = self.cfg.retry_backoff_s * 2 ** (self._failures[i] - 1)
                self.log(f"[data] source {self.sources[i].name} failed ({reason}); "
                         f"retry {self._failures[i]}/{self.cfg.source_retries} in {delay:.0f}s")
                time.sleep(delay)
        if doc is None:
            self._iters[i] = None
            if self.consumed[i] == 0:  # an empty share (tiny source, many readers): nothing to mix
                self._drop(i, f"no training documents in shard {self.shard} of {self.num_shards}")
                return None
            self.epoch[i] += 1
            self.consumed[i] = 0
            self.skip[i] = set()  # that epoch is over
            return None
        self._failures[i] = 0
        self.consumed[i] += 1
        return doc

    def _drop(self, i: int, reason: str) -> None:
        self.dead[i] = reason
        self.log(f"[data] dropping source {self.sources[i].name}: {reason}; training goes on with the others")
        if len(self.dead) == len(self.sources):
            raise AllSourcesDied([(self.sources[j].name, r) for j, r in sorted(self.dead.items())])

    def _pick(self) -> int:
        if self.strategy == "weighted":
            live = [0.0 if j in self.dead else max(w, 0.0) for j, w in enumerate(self.weights)]
            if sum(live) <= 0:  # every live weight is zero: draw the live sources evenly
                live = [0.0 if j in self.dead else 1.0 for j in range(len(self.sources))]
            return self.rng.choices(range(len(self.sources)), weights=live)[0]
        while self.turn in self.dead:
            self.turn = (self.turn + 1) % len(self.sources)
        return self.turn

    def next_document(self) -> tuple[int, Document]:
        """(source index, document)."""
        while True:
            i = self._pick()
            doc = self._next_from(i)
            if doc is None and self.strategy != "sequential" and i not in self.dead:
                doc = self._next_from(i)  # the source starts a new epoch and keeps its turn
            if self.strategy == "round_robin" or (self.strategy == "sequential" and doc is None):
                self.turn = (self.turn + 1) % len(self.sources)
            if doc is not None:
                return i, doc

    def __iter__(self):
        while True:
            yield self.next_document()

    def set_weights(self, weights: list[float]) -> None:
        """New drawing weights (one per source); switches the strategy to weighted."""
        if len(weights) != len(self.sources):
            raise ValueError(f"{len(weights)} weights for {len(self.sources)} sources")
        self.weights = [float(w) for w in weights]
        self.strategy = "weighted"

    def state_dict(self) -> dict:
        return {"epoch": list(self.epoch), "consumed": list(self.consumed), "turn": self.turn,
                "weights": list(self.weights), "rng": self.rng.getstate(), "strategy": self.strategy,
                "dead": [[i, r] for i, r in sorted(self.dead.items())],
                "skip": [sorted(s) for s in self.skip], "skip_epoch": list(self.skip_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = list(state["epoch"]), list(state["consumed"])
        self.turn, self.weights = state["turn"], list(state["weights"])
        if state.get("rng") is not None:  # None: a re-sharded start keeps this reader's own seed
            self.rng.setstate(as_rng_state(state["rng"]))
        self.strategy = state.get("strategy", self.strategy)
        self.dead = {int(i): r for i, r in state.get("dead", [])}
        self._failures = [0] * len(self.sources)
        self._iters = [None] * len(self.sources)
        self.skip = [set(ids) for ids in state.get("skip", [[] for _ in self.sources])]
        self.skip_epoch = list(state.get("skip_epoch", [-1] * len(self.sources)))


def as_rng_state(state):
    """A Python RNG state (random.getstate(), random.Random.getstate()) as saved by
    torch.save and read back with weights_only=True, where its tuples may come back as
    lists: retupled, ready for setstate."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def eval_documents(sources: list[Source], cfg: DataConfig, max_chars_per_source: int,
                   scan_limit: int = 20000) -> list[Document]:
    """Held-out documents of every source (the same on every rank), up to a character
    budget per source; streams are scanned for at most `scan_limit` documents."""
    docs = []
    for source in sources:
        chars = 0
        try:
            for n, doc in enumerate(source.documents(0, 1)):
                if n >= scan_limit or chars >= max_chars_per_source:
                    break
                if len(doc.text.strip()) >= cfg.min_text_length and is_heldout(doc.doc_id, cfg.eval_fraction):
                    docs.append(doc)
                    chars += len(doc.text)
        except Exception as e:  # evaluation goes on with what the others (and this one so far) gave
            _log.warning("[data] held-out scan of %s stopped: %s: %s", source.name, e.__class__.__name__, e)
    return docs


def sample_texts(sources: list[Source], cfg: DataConfig, max_chars: int) -> Iterator[str]:
    """Training text for learning a tokenizer: round-robin over sources, held-out excluded,
    until `max_chars` characters."""
    iters = [iter(s.documents(0, 1)) for s in sources]
    total = 0
    while iters and total < max_chars:
        for it in list(iters):
            doc = next(it, None)
            if doc is None:
                iters.remove(it)
                continue
            if is_heldout(doc.doc_id, cfg.eval_fraction):
                continue
            total += len(doc.text)
            yield doc.text
