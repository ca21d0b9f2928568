"""`text` source: local .txt/.md files or folders, long files cut at paragraph breaks."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from .base import Document, Source, SourceError

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _cut_long(para: str, max_chars: int) -> list[str]:
    """A paragraph over max_chars (a minified file, a 50 MB single line) cut at the last
    whitespace before each limit, or hard where there is none, so no document, and no
    'word' the tokenizer sees, is unbounded."""
    out, start, n = [], 0, len(para)
    while n - start > max_chars:  # indices, not re-slicing the rest: linear in the paragraph
        end = start + max_chars
        cut = max(para.rfind(" ", start, end), para.rfind("\n", start, end))
        cut = cut if cut > start + max_chars // 2 else end
        out.append(para[start:cut])
        start = cut
        while start < n and para[start] in " \n":
            start += 1
    return out + ([para[start:]] if start < n else [])


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of at most ~max_chars at blank lines; a single paragraph
    longer than max_chars is cut at whitespace."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, current, size = [], [], 0
    for block in _PARAGRAPH_BREAK.split(text):
        for para in _cut_long(block, max_chars) if len(block) > max_chars else [block]:
            if current and size + len(para) > max_chars:
                pieces.append("\n\n".join(current))
                current, size = [], 0
            current.append(para)
            size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def read_text_file(path: Path) -> str:
    """Decode as UTF-8, replacing invalid bytes, and drop NULs (binary debris)."""
    return path.read_bytes().decode("utf-8", errors="replace").replace("\x00", "")


class TextSource(Source):
    def __init__(self, path: str, name: str | None = None, extensions=(".txt", ".md"), chunk_chars: int = 8000):
        self.path = Path(path)
        self.name = name or str(path)
        self.extensions = tuple(e.lower() for e in extensions)
        self.chunk_chars = chunk_chars

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in self.extensions)

    def check(self) -> None:
        if not self.path.exists():
            raise SourceError(f"{self.path} does not exist")
        if not self.files():
            raise SourceError(f"no {'/'.join(self.extensions)} files under {self.path}")

    def documents(self, shard: int = 0, num_shards: int = 1) -> Iterator[Document]:
        position = 0
        for path in self.files():
            try:
                text = read_text_file(path)
            except OSError:
                continue  # vanished or unreadable since check(): skip the file, keep the run
            for i, piece in enumerate(split_paragraphs(text, self.chunk_chars)):
                if position % num_shards == shard:
                    yield Document(piece, self.name, f"{path.relative_to(self.path) if path != self.path else path.name}#{i}")
                position += 1
