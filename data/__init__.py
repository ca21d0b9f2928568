"""Data registry: sources, filtering, mixing, tokenizer and stream packing.
Never imports model/ or train/."""
from .adaptive import AdaptiveReweighter
from .config import DataConfig, HFSourceSpec, PdfSourceSpec, SourceSpec, TextSourceSpec, TokenizerConfig
from .formatting import check_format
from .hub import OFFLINE_HINT, hub_status
from .prefetch import PrefetchingStream, make_document_stream
from .registry import (
                       AllSourcesDied,
                       AllSourcesFailed,
                       DocumentMixer,
                       eval_documents,
                       is_heldout,
                       needs_hub,
                       open_sources,
                       sample_texts,
)
from .sources.base import Document, Source, SourceError
from .sources.builtin import BUILTIN_DATASETS, BUILTIN_TABLE, builtin_spec
from .streams import Batch, PackedStreams, eval_windows, reset_mask
from .tokenizer import TextTokenizer, TokenizerError, build_tokenizer

__all__ = [
    "AdaptiveReweighter", "AllSourcesDied", "AllSourcesFailed", "BUILTIN_DATASETS", "BUILTIN_TABLE", "Batch",
    "DataConfig", "Document", "DocumentMixer", "HFSourceSpec", "OFFLINE_HINT", "needs_hub", "PackedStreams", "PdfSourceSpec",
    "PrefetchingStream", "Source", "SourceError", "SourceSpec", "TextSourceSpec", "TextTokenizer",
    "TokenizerConfig", "TokenizerError", "build_tokenizer", "builtin_spec", "check_format", "eval_documents",
    "eval_windows", "hub_status", "is_heldout", "make_document_stream", "open_sources", "reset_mask",
    "sample_texts",
]
