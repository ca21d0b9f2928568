"""Data registry: sources, filtering, mixing, tokenizer and stream packing.
Never imports model/ or train/."""
from .config import DataConfig, HFSourceSpec, PdfSourceSpec, SourceSpec, TextSourceSpec, TokenizerConfig
from .hub import OFFLINE_HINT, hub_status
from .registry import AllSourcesFailed, DocumentMixer, eval_documents, is_heldout, open_sources, sample_texts
from .sources.base import Document, Source, SourceError
from .streams import Batch, PackedStreams, eval_windows
from .tokenizer import TextTokenizer, TokenizerError, build_tokenizer

__all__ = [
    "AllSourcesFailed", "Batch", "DataConfig", "Document", "DocumentMixer", "HFSourceSpec", "OFFLINE_HINT",
    "PackedStreams", "PdfSourceSpec", "Source", "SourceError", "SourceSpec", "TextSourceSpec", "TextTokenizer",
    "TokenizerConfig", "TokenizerError", "build_tokenizer", "eval_documents", "eval_windows", "hub_status",
    "is_heldout", "open_sources", "sample_texts",
]
