"""`pdf` source: PDFs in a folder (searched recursively) or one PDF, text extracted with
PyMuPDF, cleaned, and cut into chunks of `min_chunk_chars`..`max_chunk_chars` characters
at paragraph boundaries.

Cleaning, per file, page by page (memory stays bounded by one page plus one chunk):
- a first, cheap pass reads each page's plain text to learn the document's vocabulary
  (which words and hyphenated compounds it uses) and its running headers/footers
  (lines at the top or bottom of most pages, digits ignored);
- the second pass reads text blocks (PyMuPDF's paragraphs), drops images, headers,
  footers, bare page numbers, table-like blocks (many lines of a word or two), blocks
  that are mostly symbols (equations), and runs of one-word blocks (figure labels);
- words hyphenated at a line end are rejoined ("atten-\\ntion" -> "attention") unless
  the document shows the hyphen is real ("encoder-decoder");
- a paragraph cut by a page or column break is rejoined with its continuation;
- empty pages contribute nothing.
Extracted chunks are kept in a bounded per-process cache (64M characters), so later epochs
over a small PDF folder do not extract again.

An encrypted, damaged or image-only PDF is skipped with a one-line reason (logged once
per process); check() fails only when no PDF under the path is readable.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..config import PdfSourceSpec
from .base import Document, Source, SourceError

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_COMPOUND = re.compile(r"[^\W\d_]+-[^\W\d_]+", re.UNICODE)
_LINE_END_HYPHEN = re.compile(r"([^\W\d_]+)-\n([^\W\d_]+)", re.UNICODE)
_PAGE_NUMBER = re.compile(r"^\s*(?:page\s+)?[-–—]?\s*(?:\d{1,4}|[ivxlc]{1,6})\s*[-–—]?(?:\s*(?:of|/)\s*\d{1,4})?\s*$",
                          re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# endings that make the right half of a line-end split a word fragment ("differ-ent")
_SUFFIXES = ("ing", "ed", "er", "ers", "est", "ent", "ents", "ence", "ant", "ance", "ly", "tion", "tions",
             "sion", "ment", "ments", "ness", "ive", "al", "ally", "ous", "able", "ible", "ity", "ize",
             "ise", "ist", "ism", "ure", "es", "s", "y", "ic", "ical", "ation", "ations")
_HEADER_SAMPLE_PAGES = 40  # header/footer detection looks at most this many pages
_logged: set[tuple[str, str]] = set()
# extracted chunks kept per process: at most _CACHE_CHARS in all, files up to _CACHE_FILE_CHARS
_CACHE_CHARS = 64_000_000
_CACHE_FILE_CHARS = 8_000_000
_cache: dict[tuple, list[str]] = {}
_cache_chars = 0


def _fitz():
    import pymupdf

    pymupdf.TOOLS.mupdf_display_errors(False)  # we report problems ourselves, in one line
    return pymupdf


def _edge_key(line: str) -> str:
    """Header/footer identity: digits ignored (page numbers change), spaces collapsed."""
    return re.sub(r"\d+", "#", " ".join(line.split())).lower()


class _Vocabulary:
    """What the document itself says about words, for de-hyphenation decisions."""

    def __init__(self):
        self.words: set[str] = set()
        self.compounds: set[str] = set()

    def add(self, text: str) -> None:
        flat = _LINE_END_HYPHEN.sub(" ", text)  # line-end hyphens are the question, not evidence
        self.compounds.update(c.lower() for c in _COMPOUND.findall(flat))
        # halves of compounds ("multi" in "multi-head") are not evidence of standalone words
        self.words.update(w.lower() for w in _WORD.findall(_COMPOUND.sub(" ", flat)))

    def join(self, left: str, right: str) -> str:
        """'atten' + 'tion' -> 'attention'; 'encoder' + 'decoder' -> 'encoder-decoder'."""
        lo, ro = left.lower(), right.lower()
        if f"{lo}-{ro}" in self.compounds:
            return f"{left}-{right}"
        if lo + ro in self.words:
            return left + right
        if right[:1].isupper() or (lo in self.words and len(lo) > 2 and len(ro) > 2
                                   and (ro in self.words or not _is_fragment(ro))):
            return f"{left}-{right}"  # a word, then a word (not a suffix): a real compound
        return left + right  # typesetting hyphenation splits inside a word


def _is_fragment(word: str) -> bool:
    """A suffix with at most three letters before it ("ent", "mation"), not a word ("aligned")."""
    return any(word.endswith(sfx) and len(word) - len(sfx) <= 3 for sfx in _SUFFIXES)


def _dehyphenate(text: str, vocab: _Vocabulary) -> str:
    return _LINE_END_HYPHEN.sub(lambda m: vocab.join(m.group(1), m.group(2)), text)


def _is_noise_block(lines: list[str], text: str) -> bool:
    if len(lines) >= 3 and sum(len(l.split()) for l in lines) / len(lines) < 3:
        return True  # a table or a figure: many lines of one or two words
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return bool(visible) and letters / len(visible) < 0.5  # equations, numbers, symbols


class PdfSource(Source):
    def __init__(self, spec: PdfSourceSpec):
        self.spec = spec
        self.path = Path(spec.path).expanduser()
        self.name = spec.name or str(spec.path)
        self.min_chars = max(1, spec.min_chunk_chars)
        self.max_chars = max(self.min_chars, spec.max_chunk_chars)

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")

    def _skip(self, path: Path, reason: str) -> None:
        if (str(path), reason) not in _logged:
            _logged.add((str(path), reason))
            log.warning("[data] %s: skipping %s: %s", self.name, path, reason)

    # -- opening and the first pass -----------------------------------------------------
    def _open(self, path: Path):
        """(document, None) or (None, reason it is unreadable)."""
        fitz = _fitz()
        try:
            doc = fitz.open(path)
        except Exception as e:
            return None, f"damaged or not a PDF ({e.__class__.__name__}: {' '.join(str(e).split())[:120]})"
        if doc.needs_pass:
            doc.close()
            return None, "encrypted (needs a password)"
        if doc.page_count == 0:
            doc.close()
            return None, "damaged (no readable pages)"
        return doc, None

    def _survey(self, doc) -> tuple[_Vocabulary, set[str], int]:
        """First pass: vocabulary, repeated header/footer lines, pages with text."""
        vocab, edges, text_pages = _Vocabulary(), Counter(), 0
        step = max(1, doc.page_count // _HEADER_SAMPLE_PAGES)
        for i in range(doc.page_count):
            text = doc[i].get_text("text")
            if not text.strip():
                continue
            text_pages += 1
            vocab.add(text)
            if i % step == 0:
                lines = [l for l in text.splitlines() if l.strip()]
                edges.update({_edge_key(l) for l in lines[:2] + lines[-2:]})
        sampled = len(range(0, doc.page_count, step))
        threshold = max(3, sampled // 2 + 1)
        return vocab, {k for k, n in edges.items() if n >= threshold}, text_pages

    # -- the second pass: paragraphs ----------------------------------------------------
    def _page_paragraphs(self, page, vocab: _Vocabulary, repeated: set[str]) -> list[str]:
        fitz = _fitz()
        blocks = page.get_text("blocks", flags=fitz.TEXT_MEDIABOX_CLIP)  # ligatures expanded
        paras: list[str] = []
        short_run: list[str] = []
        for block in blocks:
            if block[6] != 0:  # an image block
                continue
            lines = [l.strip() for l in block[4].splitlines() if l.strip()]
            lines = [l for l in lines if _edge_key(l) not in repeated and not _PAGE_NUMBER.match(l)]
            if not lines:
                continue
            raw = "\n".join(lines)
            if _is_noise_block(lines, raw):
                continue
            text = " ".join(_dehyphenate(raw, vocab).split())
            if len(text.split()) <= 2:  # possibly a heading, possibly a figure label
                short_run.append(text)
                continue
            if 0 < len(short_run) < 4:  # a few short blocks are headings: keep them
                paras.extend(short_run)
            short_run = []  # four or more in a row are figure labels: drop them
            paras.append(text)
        if 0 < len(short_run) < 4:
            paras.extend(short_run)
        return paras

    def _paragraphs(self, doc, vocab: _Vocabulary, repeated: set[str]) -> Iterator[str]:
        """The document's paragraphs, with paragraphs split by page/column breaks rejoined."""
        pending: Optional[str] = None
        for i in range(doc.page_count):
            for para in self._page_paragraphs(doc[i], vocab, repeated):
                if pending is not None:
                    m = re.search(r"([^\W\d_]+)-$", pending)
                    first = re.match(r"[^\W\d_]+", para)
                    if m and first and para[0].islower():  # "atten-" | "tion ..."
                        joined = vocab.join(m.group(1), first.group(0))
                        pending = pending[: m.start()] + joined + para[first.end():]
                        continue
                    if pending[-1:] not in ".!?:;\"')]" and para[:1].islower():
                        pending = f"{pending} {para}"  # a sentence continues in the next column
                        continue
                    yield pending
                pending = para
        if pending is not None:
            yield pending

    # -- chunking ------------------------------------------------------------------------
    def _pieces(self, para: str) -> Iterator[str]:
        """A paragraph in pieces of at most max_chars: sentences, then words, then a hard cut."""
        if len(para) <= self.max_chars:
            yield para
            return
        current = ""
        for unit in _SENTENCE_END.split(para):
            for part in (unit.split(" ") if len(unit) > self.max_chars else [unit]):
                while len(part) > self.max_chars:  # one enormous "word": cut it
                    if current:
                        yield current
                        current = ""
                    yield part[: self.max_chars]
                    part = part[self.max_chars:]
                if current and len(current) + 1 + len(part) > self.max_chars:
                    yield current
                    current = part
                else:
                    current = f"{current} {part}" if current else part
        if current:
            yield current

    def _chunks(self, paragraphs: Iterable[str]) -> Iterator[str]:
        """Chunks of min..max characters on paragraph boundaries (the last may be shorter).
        A paragraph that would overflow a chunk still short of the minimum is split at
        sentence boundaries to fill it."""
        parts: list[str] = []
        size = 0
        for para in paragraphs:
            for piece in self._pieces(para):
                while piece:
                    added = len(piece) + (2 if parts else 0)
                    if size + added <= self.max_chars:
                        parts.append(piece)
                        size += added
                        piece = ""
                    elif size >= self.min_chars:
                        yield "\n\n".join(parts)
                        parts, size = [], 0
                    else:  # too short to close, too long to take whole: take sentences
                        room = self.max_chars - size - (2 if parts else 0)
                        head, piece = _split_at_sentence(piece, room)
                        if head:
                            parts.append(head)
                        yield "\n\n".join(parts)
                        parts, size = [], 0
        if parts:
            yield "\n\n".join(parts)

    # -- Source interface ---------------------------------------------------------------
    def file_chunks(self, path: Path) -> Iterator[str]:
        """The chunks of one PDF (nothing, with the reason logged, if it is unreadable)."""
        doc, reason = self._open(path)
        if doc is None:
            self._skip(path, reason)
            return
        try:
            vocab, repeated, text_pages = self._survey(doc)
            if text_pages == 0:
                self._skip(path, "no text layer (image-only? OCR is not done)")
                return
            yield from self._chunks(self._paragraphs(doc, vocab, repeated))
        except Exception as e:  # damage found mid-file: keep what was read, report the rest
            self._skip(path, f"damaged ({e.__class__.__name__}: {' '.join(str(e).split())[:120]})")
        finally:
            doc.close()

    def check(self) -> None:
        if not self.path.exists():
            raise SourceError(f"{self.path} does not exist")
        files = self.files()
        if not files:
            raise SourceError(f"no .pdf files under {self.path}")
        reasons = []
        for path in files:  # the first readable PDF is enough
            doc, reason = self._open(path)
            if doc is not None:
                try:
                    if any(doc[i].get_text("text").strip() for i in range(doc.page_count)):
                        return
                    reason = "no text layer (image-only? OCR is not done)"
                finally:
                    doc.close()
            self._skip(path, reason)
            reasons.append(f"{path.name}: {reason}")
        more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
        raise SourceError(f"no readable PDF under {self.path}: {'; '.join(reasons[:3])}{more}")

    def cached_chunks(self, path: Path) -> Iterator[str]:
        """file_chunks, remembered per process for later epochs while the cache has room
        (extraction costs far more than reading, and small PDF folders are read many times)."""
        global _cache_chars
        try:
            st = path.stat()
        except OSError as e:
            self._skip(path, f"unreadable ({e.__class__.__name__})")
            return
        key = (str(path), st.st_mtime_ns, st.st_size, self.min_chars, self.max_chars)
        if key in _cache:
            yield from _cache[key]
            return
        chunks, size = [], 0
        for chunk in self.file_chunks(path):
            yield chunk
            if chunks is not None:
                chunks.append(chunk)
                size += len(chunk)
                if size > _CACHE_FILE_CHARS:
                    chunks = None  # too big to keep: stream it every time
        if chunks is not None and _cache_chars + size <= _CACHE_CHARS:
            _cache[key] = chunks
            _cache_chars += size

    def documents(self, shard: int = 0, num_shards: int = 1) -> Iterator[Document]:
        """This reader's chunks (data.sharding.file_shares): with at least as many PDFs as
        readers, whole files, so no reader extracts a file another one uses; with fewer,
        the readers of a file split its chunks by position (one PDF: chunk % num_shards)."""
        from ..sharding import file_shares

        files = self.files()
        for f, group, index in file_shares(shard, num_shards, len(files)):
            path = files[f]
            rel = path.relative_to(self.path) if path != self.path else Path(path.name)
            for k, chunk in enumerate(self.cached_chunks(path)):
                if k % group == index:
                    yield Document(chunk, self.name, f"{rel}#{k}")


def _split_at_sentence(text: str, room: int) -> tuple[str, str]:
    """(the longest run of whole sentences that fits in `room`, the rest)."""
    if room <= 0:
        return "", text
    cut = 0
    for m in _SENTENCE_END.finditer(text):
        if m.start() > room:
            break
        cut = m.end()
    if cut == 0:  # no sentence end in reach: cut at the last space
        cut = text.rfind(" ", 0, room + 1) + 1
    if cut <= 0:
        return "", text
    return text[:cut].rstrip(), text[cut:]
