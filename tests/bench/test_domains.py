"""The held-out domains of bench/quality.py: a held-out file never reaches training, and
each domain's bytes (the denominator of its bits per byte) are counted exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.domains import all_domains, domain_documents, heldout_set, position_set, token_bytes
from bench.quality import split_corpus, text_sources
from data import DataConfig, TextSourceSpec, TokenizerConfig, build_tokenizer, open_sources

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
CORPUS_DOMAINS = ["novels", "satire", "dialogue", "paper", "qa", "technical"]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    if not (CORPUS / "library").is_dir():
        pytest.skip(f"real-text corpus not found at {CORPUS} (it lives beside the project in ../shared/corpus)")
    found = all_domains(CORPUS, tmp_path_factory.mktemp("cache"), CORPUS_DOMAINS, log=print)
    assert [d.name for d in found] == CORPUS_DOMAINS
    return found


def training_texts(folders: list[Path]) -> list[str]:
    data = DataConfig(sources=[TextSourceSpec(**s) for s in text_sources(folders)], eval_fraction=0.0)
    return [d.text for source in open_sources(data) for d in source.documents()]


def test_a_held_out_file_never_reaches_training(domains, tmp_path):
    library = CORPUS / "library"
    held = [f for d in domains for f in d.files]
    train_dirs = split_corpus([library], held, tmp_path)
    trained = set(training_texts(train_dirs))
    for domain in domains:
        if not any(library in f.parents for f in domain.files):
            continue
        docs = domain_documents(domain)
        assert docs and not trained & set(docs), f"{domain.name} reached training"
    # the check can see a leak: the library as it is holds those documents
    satire = next(d for d in domains if d.name == "satire")
    assert set(domain_documents(satire)) <= set(training_texts([library]))
    # and the files not held out are all still there, under the same relative paths
    kept = sorted(p.relative_to(train_dirs[0]) for p in train_dirs[0].rglob("*") if p.is_file())
    assert kept == sorted(p.relative_to(library) for p in library.rglob("*") if p.is_file() and p not in held)


def test_each_domains_bytes_are_counted_exactly(domains):
    sample = [domain_documents(d)[0][:20_000] for d in domains]
    tok = build_tokenizer(TokenizerConfig(type="bpe", vocab_size=600), sample)
    table = token_bytes(tok)
    for domain in domains:
        docs = domain_documents(domain)
        ids = tok.encode_batch(docs)
        for doc, doc_ids in zip(docs[:20], ids):  # every token's bytes add up to the document's UTF-8 size
            assert int(table[doc_ids].sum()) == len(doc.encode("utf-8")), domain.name
        streams, seq, max_tokens = 4, 64, 6_000
        held = heldout_set(domain, tok, streams, seq, max_tokens, reach=3 * seq)
        # recount from the documents taken: the windows predict flat[1 : streams x per-stream + 1]
        taken = ids[::max(1, -(-sum(len(x) + 1 for x in ids) // max_tokens))]
        flat = [t for x in taken for t in [*x, tok.eot_id]]
        predicted = len(held.windows) * seq * held.windows[0].shape[0]
        assert held.bytes == int(table[torch.tensor(flat[1:predicted + 1])].sum()), domain.name
        assert held.bytes > 0 and held.documents == len(taken)


def test_positions_in_whole_books_are_bucketed_exactly(domains):
    novels = next(d for d in domains if d.name == "novels")
    tok = build_tokenizer(TokenizerConfig(type="bpe", vocab_size=600), [domain_documents(novels)[0][:20_000]])
    windows, masks = position_set(novels.files, tok, seq=500, length=12_345)
    assert len(windows) == 24 and all(w.shape == (2, 501) for w in windows)  # 12,000 tokens, one book a stream
    first = tok.encode(novels.files[0].read_text(encoding="utf-8"))
    assert windows[0][0].tolist() == first[:501] and windows[-1][0, -1].item() == first[12_000]
    assert list(masks) == ["pos_0_1000", "pos_1000_4000", "pos_4000_10000", "pos_10000_99999"]
    counts = {name: sum(int(m[0].sum()) for m in ms) for name, ms in masks.items()}
    assert counts == {"pos_0_1000": 999, "pos_1000_4000": 3000, "pos_4000_10000": 6000, "pos_10000_99999": 2001}
    together = sum(torch.stack([ms[i] for i in range(len(windows))]).long() for ms in masks.values())
    assert together.eq(1).all()  # every target in exactly one bucket
