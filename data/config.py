"""The `data` and `tokenizer` sections of a preset, as dataclasses.

The preset validator reads the type hints and defaults from these classes: a field here
is a preset key. A source is either a bare string (a built-in dataset name such as
"fineweb_edu", a hub id "owner/name", or a local path) or an object whose `type` picks
one of the specs below.
Relative paths are relative to the project root (where main.py is).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


def ranged(default, interval: str):
    """A numeric preset key's field: its default and its valid interval ("[0, 1)": 0
    allowed, 1 not), which the preset validator checks (presets/rules.py)."""
    return field(default=default, metadata={"range": interval})


@dataclass
class TextSourceSpec:
    """Local .txt/.md files: one file, or a folder searched recursively."""

    type: Literal["text"]
    path: str
    name: Optional[str] = None  # shown in logs and per-source loss; default: the path
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md"])
    chunk_chars: int = ranged(8000, "[100, 1e9]")  # long files are cut into documents of about this size


@dataclass
class HFSourceSpec:
    """A Hugging Face dataset, streamed; or local json/jsonl/parquet/text files through
    the same loader (`"dataset": "json", "data_files": "qa.jsonl"`)."""

    type: Literal["hf"]
    dataset: str
    name: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    fields: Optional[list[str]] = None  # multi-field records, joined by `format`
    format: Optional[str] = None  # e.g. "Q: {question}\nA: {answer}"
    data_files: Optional[Union[str, list[str]]] = None
    chunk_chars: int = ranged(0, "[0, 1e9]")  # 0 keeps records whole


@dataclass
class PdfSourceSpec:
    """A folder of PDFs (searched recursively), or one PDF."""

    type: Literal["pdf"]
    path: str
    name: Optional[str] = None
    min_chunk_chars: int = ranged(3000, "[1, 1e9]")
    max_chunk_chars: int = ranged(5000, "[1, 1e9]")


SourceSpec = Union[str, TextSourceSpec, HFSourceSpec, PdfSourceSpec]


@dataclass
class DataConfig:
    sources: list[SourceSpec] = field(default_factory=list)
    mix_strategy: Literal["round_robin", "sequential", "weighted"] = "round_robin"
    source_weights: Optional[list[float]] = None  # for "weighted", one per source
    eval_fraction: float = ranged(0.01, "[0, 0.5)")  # share of documents held out for evaluation (by hash of id)
    min_text_length: int = ranged(32, "[0, 1e9]")  # shorter documents are dropped
    dedup: bool = True  # drop exact duplicate documents within a run
    num_workers: int = ranged(0, "[0, 256]")  # background reader/tokenizer processes per rank (0: in the training process)
    prefetch_docs: int = ranged(64, "[1, 1e6]")  # documents each background worker may run ahead of the consumer
    source_retries: int = ranged(3, "[0, 100]")  # a source whose reader raises is reopened this many times, then dropped
    retry_backoff_s: float = ranged(2.0, "[0, 3600]")  # wait before the first retry; doubles with each further one
    seed: int = ranged(0, "[0, 4294967295]")


@dataclass
class TokenizerConfig:
    type: Literal["bpe", "hf", "file"] = "bpe"
    name: Optional[str] = None  # "hf": a Hugging Face tokenizer name such as "gpt2"
    path: Optional[str] = None  # "file": a local tokenizer.json
    vocab_size: int = ranged(8192, "[257, 1048576]")  # "bpe": trained on the preset's own sources
    train_chars: int = ranged(5_000_000, "[1000, 1e11]")  # "bpe": characters of training text used to learn merges
