"""`hf` source: a Hugging Face dataset, streamed with `datasets.load_dataset(...,
streaming=True)` (nothing is downloaded in full), or local data through the same loader:
a local dataset folder, a local .json/.jsonl/.parquet/.csv/.txt file given as `dataset`,
or a packaged builder with local files (`"dataset": "json", "data_files": "qa.jsonl"`).

A record becomes a document through `text_field`, or through `fields` + `format`
(see data/formatting.py). Records missing a needed field are skipped and counted.

Sharding (data.sharding.file_shares). Document ids are `"{file}:{row}"` (file = the
stream's shard index, usually one data file; row = the record's index in it), so they do
not depend on how the stream is split. With at least as many files as readers, reader k
reads whole files f % num_shards == k (no reader downloads what another one reads);
with fewer, the readers sharing a file split it by row position (one file: row %
num_shards == k, the Source contract's position rule). Either way the shares are
disjoint, cover everything, and come in a fixed order.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from ..config import HFSourceSpec
from ..formatting import check_format, compile_format, field_text, render
from ..hub import hub_status
from .base import Document, Source, SourceError
from .text import split_paragraphs

log = logging.getLogger(__name__)

# builders shipped inside `datasets` that read the files you give them (no hub, no code)
PACKAGED_BUILDERS = {"json", "parquet", "csv", "text", "arrow", "pandas"}
_SUFFIX_BUILDER = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                   ".txt": "text", ".arrow": "arrow"}
_BATCH = 256  # records decoded per arrow batch (columnar reads are much faster than row dicts)


def _builder_for(path: Path) -> Optional[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return _SUFFIX_BUILDER.get(suffixes[-1]) if suffixes else None


def _data_file_list(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _data_file_list(v)]
    return [str(f) for f in data_files]


def _is_remote(path: str) -> bool:
    return "://" in path


class HFSource(Source):
    def __init__(self, spec: HFSourceSpec):
        self.spec = spec
        files = _data_file_list(spec.data_files)
        default = files[0] if spec.dataset in PACKAGED_BUILDERS and len(files) == 1 else spec.dataset
        self.name = spec.name or (f"{default}/{spec.config}" if spec.config else default)
        self.fields = list(spec.fields) if spec.fields else [spec.text_field]
        self.skipped = 0  # records in this reader's share skipped for a missing field (this process)
        self._warned = False

    # -- where the data lives ------------------------------------------------------------
    def is_local(self) -> bool:
        """Local data needs no hub: an existing path, or a packaged builder over local files."""
        if self.spec.dataset in PACKAGED_BUILDERS:
            files = _data_file_list(self.spec.data_files)
            return bool(files) and not any(_is_remote(f) for f in files)
        return self._path().exists()

    def _path(self) -> Path:
        return Path(os.path.expanduser(self.spec.dataset))

    def needs_hub(self) -> bool:
        if self.is_local():
            return False
        files = _data_file_list(self.spec.data_files)
        if self.spec.dataset in PACKAGED_BUILDERS:  # remote files: only hf:// ones need the hub
            return any(f.startswith("hf://") for f in files)
        return True

    def _load_kwargs(self) -> tuple[str, dict]:
        spec, path = self.spec, self.spec.dataset
        kwargs = {"split": spec.split, "streaming": True}
        if spec.config:
            kwargs["name"] = spec.config
        if spec.data_files is not None:
            kwargs["data_files"] = spec.data_files
        p = self._path()
        if path not in PACKAGED_BUILDERS and p.is_file():  # a single local file given as `dataset`
            builder = _builder_for(p)
            if builder is None:
                raise SourceError(f"{path}: unknown file type (use .jsonl, .json, .parquet, .csv or .txt)")
            path, kwargs["data_files"] = builder, str(p)
        return path, kwargs

    def _open(self):
        """The streaming IterableDataset (only the columns we read)."""
        import datasets

        p = self._path()
        if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))  # a folder written by save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                if self.spec.split not in ds:
                    raise SourceError(f"{p}: no split {self.spec.split!r} (has {', '.join(ds)})")
                ds = ds[self.spec.split]
            ds = ds.to_iterable_dataset(num_shards=1)
        else:
            path, kwargs = self._load_kwargs()
            # trust_remote_code is never passed: dataset scripts are not run
            ds = datasets.load_dataset(str(p) if p.is_dir() else path, **kwargs)
        names = ds.column_names
        if names:  # known up front (parquet, arrow, hub datasets with metadata)
            missing = [f for f in self.fields if f not in names]
            if missing:
                raise SourceError(f"{self.name}: no column {', '.join(map(repr, missing))} "
                                  f"(columns: {', '.join(names)}); set text_field or fields")
            ds = ds.select_columns(self.fields)
        return ds

    # -- Source interface ---------------------------------------------------------------
    def check(self) -> None:
        spec = self.spec
        if spec.fields is not None or spec.format is not None:
            if not spec.fields or not spec.format:
                raise SourceError(f"{self.name}: `fields` and `format` go together")
            problem = check_format(spec.format, spec.fields)
            if problem:
                raise SourceError(problem)
        if self.needs_hub():
            if _looks_like_path(spec.dataset):
                raise SourceError(f"{spec.dataset} does not exist")
            ok, reason = hub_status()  # seconds, not minutes of HTTP retries
            if not ok:
                raise SourceError(f"{spec.dataset}: {reason}")  # the offline hint is said once, by the caller
        elif spec.dataset in PACKAGED_BUILDERS:
            for f in _data_file_list(spec.data_files):
                if not _is_remote(f) and next(_glob(f), None) is None:
                    raise SourceError(f"{f} does not exist")
        try:
            ds = self._open()
            first = next(iter(ds.take(1)), None)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{self.name}: could not open: {_one_line(e)}") from None
        if first is None:
            raise SourceError(f"{self.name}: split {spec.split!r} is empty")
        missing = [f for f in self.fields if f not in first]
        if missing:
            raise SourceError(f"{self.name}: records have no {', '.join(map(repr, missing))} "
                              f"(they have: {', '.join(first)}); set text_field or fields")

    def _text(self, record: dict) -> tuple[Optional[str], Optional[str]]:
        if self.spec.fields:
            if not hasattr(self, "_template"):
                self._template = compile_format(self.spec.format, self.spec.fields)
            return render(self._template, record)
        text = field_text(record.get(self.spec.text_field))
        return (text, None) if text is not None else (None, self.spec.text_field)

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[str, dict]]:
        """(record id, record) of this reader's share, in a fixed order (see file_shares)."""
        from ..sharding import file_shares

        ds = self._open()
        n_files = max(1, ds.num_shards or 1)
        for f, group, index in file_shares(shard, num_shards, n_files):
            part = ds.shard(num_shards=n_files, index=f) if n_files > 1 else ds
            row = 0
            for batch in part.iter(batch_size=_BATCH):
                keys, columns = list(batch), list(batch.values())
                for values in zip(*columns):
                    if row % group == index:
                        yield f"{f}:{row}", dict(zip(keys, values))
                    row += 1

    def documents(self, shard: int = 0, num_shards: int = 1) -> Iterator[Document]:
        chunk = self.spec.chunk_chars
        for rid, record in self.records(shard, num_shards):
            text, missing = self._text(record)
            if text is None:
                self.skipped += 1
                if not self._warned:
                    self._warned = True
                    log.warning("[data] %s: skipping records without %r (counted in .skipped)", self.name, missing)
                continue
            if chunk and len(text) > chunk:
                for k, piece in enumerate(split_paragraphs(text, chunk)):
                    yield Document(piece, self.name, f"{rid}#{k}")
            else:
                yield Document(text, self.name, rid)

    def __getstate__(self):  # picklable for worker processes: drop the compiled template
        state = dict(self.__dict__)
        state.pop("_template", None)
        return state


def _glob(pattern: str):
    p = Path(pattern)
    if p.exists():
        yield p
        return
    anchor = Path(p.anchor) if p.is_absolute() else Path(".")
    rel = str(p.relative_to(p.anchor)) if p.is_absolute() else pattern
    yield from anchor.glob(rel)


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("owner/name")."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or _builder_for(Path(name)) is not None)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return f"{e.__class__.__name__}: {text}"[:400]
