"""The `pdf` source: readable English out of a real two-column paper, chunks of the
configured size on paragraph boundaries, running headers/footers and page numbers gone,
line-end hyphenation undone, and unreadable PDFs skipped with a one-line reason."""
import logging
import re
import shutil

import pytest

from data import PdfSourceSpec, SourceError
from data.sources.pdf import PdfSource

from .conftest import corpus_path


def pdf(path, **kwargs) -> PdfSource:
    return PdfSource(PdfSourceSpec(type="pdf", path=str(path), **kwargs))


@pytest.fixture(scope="module")
def paper_docs():
    source = pdf(corpus_path("pdf"))
    source.check()
    return list(source.documents())


def test_the_paper_reads_as_clean_english(paper_docs):
    text = "\n\n".join(d.text for d in paper_docs)
    assert len(text) > 20_000 and text.count("attention") > 20
    assert "Scaled Dot-Product Attention" in text and "transduction" in text
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert letters / len(text) > 0.7
    # no typesetting hyphenation left: "transduc- tion", "convolu-\ntional", ...
    assert not re.search(r"\b(?:transduc|convolu|transfor|atten|multi)-\s", text)
    assert not re.search(r"[a-z]-\n[a-z]", text)
    assert "encoder-decoder" in text  # real hyphens stay
    # bare page numbers are gone
    assert not any(re.fullmatch(r"\d{1,3}", para.strip()) for d in paper_docs for para in d.text.split("\n\n"))


def test_chunks_are_in_range_and_end_on_paragraphs(paper_docs):
    sizes = [len(d.text) for d in paper_docs]
    assert len(sizes) >= 5
    assert all(3000 <= n <= 5000 for n in sizes[:-1]) and 0 < sizes[-1] <= 5000
    assert [d.doc_id for d in paper_docs] == [f"attention_is_all_you_need.pdf#{k}" for k in range(len(paper_docs))]


def test_custom_chunk_sizes_are_respected():
    docs = list(pdf(corpus_path("pdf"), min_chunk_chars=800, max_chunk_chars=1200).documents())
    assert all(800 <= len(d.text) <= 1200 for d in docs[:-1]) and len(docs[-1].text) <= 1200


def test_shards_are_disjoint_and_cover_the_chunks(paper_docs):
    source = pdf(corpus_path("pdf"))
    shares = [[d.doc_id for d in source.documents(k, 3)] for k in range(3)]
    assert sorted(sum(shares, [])) == sorted(d.doc_id for d in paper_docs)


def _synthetic_pdf(path, pages=6):
    """Pages with a running header, a page-number footer, and a word hyphenated at a line end."""
    import pymupdf

    topics = ["rivers", "forests", "deserts", "glaciers", "islands", "valleys", "meadows", "canyons"]
    doc = pymupdf.open()
    for n in range(1, pages + 1):
        page = doc.new_page()
        page.insert_text((72, 40), "Journal of Synthetic Results, Vol. 3", fontsize=9)
        body = (f"This part of the study is about {topics[n]} and explains how the mechanism of atten-\n"
                "tion lets every position look at every other position in a sequence,\n"
                "which makes long-range dependencies easy to learn for the model.")
        page.insert_text((72, 120), body, fontsize=11)
        page.insert_text((300, 800), str(n), fontsize=9)
    doc.save(path)


def test_headers_page_numbers_and_hyphenation_are_cleaned(tmp_path):
    _synthetic_pdf(tmp_path / "study.pdf")
    docs = list(pdf(tmp_path, min_chunk_chars=100, max_chunk_chars=5000).documents())
    text = "\n\n".join(d.text for d in docs)
    assert "Journal of Synthetic Results" not in text
    assert text.count("mechanism of attention lets every position") == 6
    assert not any(re.fullmatch(r"\d+", p.strip()) for p in text.split("\n\n"))


def test_with_enough_files_each_reader_extracts_whole_files(tmp_path):
    for name in ("a.pdf", "b.pdf", "sub/c.pdf"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _synthetic_pdf(tmp_path / name, pages=3)
    source = pdf(tmp_path, min_chunk_chars=50, max_chunk_chars=400)
    everything = [d.doc_id for d in source.documents()]
    shares = [[d.doc_id for d in source.documents(k, 2)] for k in range(2)]
    assert {i.split("#")[0] for i in shares[0]} == {"a.pdf", "sub/c.pdf"} and {i.split("#")[0] for i in shares[1]} == {"b.pdf"}
    assert sorted(shares[0] + shares[1]) == sorted(everything)


def test_damaged_pdf_is_skipped_with_a_reason(tmp_path, caplog):
    real = corpus_path("pdf", "attention_is_all_you_need.pdf")
    shutil.copy(real, tmp_path / "good.pdf")
    (tmp_path / "broken.pdf").write_bytes(real.read_bytes()[:20_000])  # truncated download
    (tmp_path / "notes.txt").write_text("not a pdf")
    source = pdf(tmp_path)
    with caplog.at_level(logging.WARNING):
        source.check()
        docs = list(source.documents())
    assert docs and all(d.doc_id.startswith("good.pdf#") for d in docs)
    skipped = [r.getMessage() for r in caplog.records if "broken.pdf" in r.getMessage()]
    assert len(skipped) == 1 and "damaged" in skipped[0] and "\n" not in skipped[0]


def test_encrypted_and_image_only_pdfs_are_skipped_and_fail_check_alone(tmp_path):
    import pymupdf

    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret text " * 20)
    doc.save(tmp_path / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")
    blank = pymupdf.open()
    blank.new_page()
    blank.save(tmp_path / "scan.pdf")
    (tmp_path / "empty.pdf").write_bytes(b"%PDF-1.4\n")
    source = pdf(tmp_path)
    with pytest.raises(SourceError) as failed:
        source.check()
    reason = str(failed.value)
    assert "no readable PDF" in reason and "encrypted" in reason and "no text layer" in reason
    assert list(source.documents()) == []


def test_missing_folder_fails_check(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        pdf(tmp_path / "nope").check()
    with pytest.raises(SourceError, match="no .pdf files"):
        pdf(tmp_path).check()
