"""Built-in dataset names usable as a bare string in `data.sources` ("fineweb_edu").

Each expands to an `hf` source spec over a script-free Hugging Face dataset (parquet or
json files; no dataset script is ever run). Repo ids, configs and field names were
checked against the hub's file listings where possible; see BUILTIN_TABLE for notes.
"""
from __future__ import annotations

from ..config import HFSourceSpec

# name -> HFSourceSpec keyword arguments (type="hf" and name=<key> are added by builtin_spec)
BUILTIN_DATASETS: dict[str, dict] = {
    "fineweb_edu": {"dataset": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "text_field": "text"},
    "wikipedia": {"dataset": "wikimedia/wikipedia", "config": "20231101.en", "text_field": "text"},
    # Skylion007/openwebtext still shipped a loading script (openwebtext.py) that
    # datasets>=4 refuses to run; this mirror holds the same 8.01M documents as parquet.
    "openwebtext": {"dataset": "vietgpt/openwebtext_en", "text_field": "text"},
    "c4": {"dataset": "allenai/c4", "config": "en", "text_field": "text"},
    # the 6B-token random sample of SlimPajama-627B, as parquet (the full set is jsonl.zst)
    "slimpajama": {"dataset": "DKYoon/SlimPajama-6B", "text_field": "text"},
    # deepmind/pg19 is script-based; emozilla/pg19 is the parquet copy. Books are long:
    # cut into ~8k-character documents at paragraph breaks.
    "pg19": {"dataset": "emozilla/pg19", "text_field": "text", "chunk_chars": 8000},
    "tinystories": {"dataset": "roneneldan/TinyStories", "text_field": "text"},
    "natural_questions": {"dataset": "sentence-transformers/natural-questions", "config": "pair",
                          "fields": ["query", "answer"], "format": "Q: {query}\nA: {answer}"},
}

BUILTIN_TABLE = """\
| name | Hugging Face dataset | config | text | notes |
| --- | --- | --- | --- | --- |
| `fineweb_edu` | `HuggingFaceFW/fineweb-edu` | `sample-10BT` | `text` | 10B-token sample, 14 parquet files |
| `wikipedia` | `wikimedia/wikipedia` | `20231101.en` | `text` | English Wikipedia, Nov 2023 dump |
| `openwebtext` | `vietgpt/openwebtext_en` | default | `text` | parquet mirror of OpenWebText (8.01M docs); `Skylion007/openwebtext` needs a dataset script |
| `c4` | `allenai/c4` | `en` | `text` | json.gz shards |
| `slimpajama` | `DKYoon/SlimPajama-6B` | default | `text` | 6B-token sample of SlimPajama-627B, parquet |
| `pg19` | `emozilla/pg19` | default | `text` | parquet copy of `deepmind/pg19` (script-based); books cut into ~8k-char documents |
| `tinystories` | `roneneldan/TinyStories` | default | `text` | parquet files under `data/` |
| `natural_questions` | `sentence-transformers/natural-questions` | `pair` | `Q: {query}\\nA: {answer}` | question + Wikipedia answer passage |
"""


def builtin_spec(name: str) -> HFSourceSpec:
    """The `hf` source spec a built-in name stands for."""
    if name not in BUILTIN_DATASETS:
        raise KeyError(f"unknown built-in dataset {name!r}; known: {', '.join(sorted(BUILTIN_DATASETS))}")
    return HFSourceSpec(type="hf", name=name, **BUILTIN_DATASETS[name])
