"""How many tokens per second the data registry delivers from local files.

For each format (text, jsonl, parquet, pdf) and 0, 1 and 2 background workers, packs the
stream into [B, T+1] batches exactly as training does (PackedStreams) and prints one JSON
line: tokens/s after start-up, the start-up time (first batch, which includes launching
the workers), and the CPU time the consuming (training) process spends per token. The jsonl and parquet files are made from ../shared/corpus/books
in a temporary folder; the tokenizer is a byte-level BPE learned with data.build_tokenizer
on a sample of the books.

    python bench/data_throughput.py [--seconds 5] [--batch-size 8] [--seq-length 512]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import (  # noqa: E402
    DataConfig,
    HFSourceSpec,
    PackedStreams,
    PdfSourceSpec,
    TextSourceSpec,
    TokenizerConfig,
    build_tokenizer,
    make_document_stream,
    open_sources,
    sample_texts,
)
from data.sources.text import split_paragraphs  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"


def write_tables(books: Path, out: Path) -> tuple[Path, Path]:
    """The books as ~4k-character records: one jsonl file and four parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for path in sorted(books.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        records += [{"text": piece, "source": path.name} for piece in split_paragraphs(text, 4000) if piece.strip()]
    jsonl = out / "books.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    parquet = out / "parquet"
    parquet.mkdir()
    quarter = (len(records) + 3) // 4
    for f in range(4):
        part = records[f * quarter:(f + 1) * quarter]
        pq.write_table(pa.Table.from_pylist(part), parquet / f"train-{f:05d}-of-00004.parquet")
    return jsonl, parquet


def measure(spec, workers: int, tokenizer, args) -> dict:
    cfg = DataConfig(sources=[spec], num_workers=workers)
    sources = open_sources(cfg, log=lambda m: print(m, file=sys.stderr))
    stream = make_document_stream(sources, cfg, tokenizer=tokenizer)
    packed = PackedStreams(stream, tokenizer.encode_batch, tokenizer.eot_id, args.batch_size, args.seq_length)
    start = time.perf_counter()
    packed.next_batch()  # start-up: workers launched, sources opened, buffers first filled
    startup = time.perf_counter() - start
    batches, begin, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - begin < args.seconds:
        packed.next_batch()
        batches += 1
    elapsed, cpu = time.perf_counter() - begin, time.process_time() - cpu
    if hasattr(stream, "close"):
        stream.close()
    tokens = batches * args.batch_size * args.seq_length
    # consumer CPU per token: what the training process itself spends on data (all its
    # threads); robust to other load on the machine, unlike tokens/s
    return {"tokens_per_s": round(tokens / elapsed), "startup_s": round(startup, 2), "tokens": tokens,
            "seconds": round(elapsed, 2), "consumer_cpu_us_per_token": round(cpu / tokens * 1e6, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per configuration")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--formats", nargs="+", default=["text", "jsonl", "parquet", "pdf"])
    args = parser.parse_args()
    if not (CORPUS / "books").is_dir():
        sys.exit(f"corpus not found at {CORPUS}")

    with tempfile.TemporaryDirectory() as tmp:
        jsonl, parquet = write_tables(CORPUS / "books", Path(tmp))
        specs = {
            "text": TextSourceSpec(type="text", path=str(CORPUS / "books")),
            "jsonl": HFSourceSpec(type="hf", dataset="json", data_files=str(jsonl)),
            "parquet": HFSourceSpec(type="hf", dataset=str(parquet)),
            "pdf": PdfSourceSpec(type="pdf", path=str(CORPUS / "pdf")),
        }
        sample_cfg = DataConfig(sources=[specs["text"]])
        t = time.perf_counter()
        tokenizer = build_tokenizer(TokenizerConfig(vocab_size=args.vocab_size, train_chars=2_000_000),
                                    sample_texts(open_sources(sample_cfg), sample_cfg, 2_000_000))
        print(f"# BPE vocab {tokenizer.vocab_size} learned in {time.perf_counter() - t:.1f}s; "
              f"batches of {args.batch_size}x{args.seq_length}", file=sys.stderr)
        for fmt in args.formats:
            for workers in args.workers:
                result = measure(specs[fmt], workers, tokenizer, args)
                print(json.dumps({"format": fmt, "workers": workers, **result}), flush=True)


if __name__ == "__main__":
    main()
