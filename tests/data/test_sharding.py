"""Every (rank, worker) reader gets a disjoint share of every source and together they
cover it: the file/position plan, and the real sources over it."""
import pytest

from data import HFSourceSpec, TextSourceSpec
from data.registry import file_shares, make_source

from .conftest import corpus_path


@pytest.mark.parametrize("n_files", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("readers", [1, 2, 3, 4, 6, 8])
def test_file_shares_partition_every_file(n_files, readers):
    rows = 10  # records per file
    owner = {}
    for shard in range(readers):
        for f, group, index in file_shares(shard, readers, n_files):
            for row in range(rows):
                if row % group == index:
                    assert (f, row) not in owner, f"{(f, row)} read by {owner[(f, row)]} and {shard}"
                    owner[(f, row)] = shard
    assert len(owner) == n_files * rows
    if n_files >= readers:  # whole files: no file is opened by two readers
        assert all(len({s for (f, _), s in owner.items() if f == g}) == 1 for g in range(n_files))


def test_two_ranks_by_two_workers_over_every_source_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in range(3):  # 3 files for 4 readers: the shared-file case
        pq.write_table(pa.table({"text": [f"file {f} record {r} " * 5 for r in range(20)]}), tmp_path / f"{f}.parquet")
    sources = [
        make_source(HFSourceSpec(type="hf", dataset=str(tmp_path))),
        make_source(HFSourceSpec(type="hf", dataset=str(corpus_path("qa", "reading_qa.jsonl")), text_field="question")),
        make_source(TextSourceSpec(type="text", path=str(corpus_path("books")), chunk_chars=20_000)),
        make_source(str(corpus_path("pdf"))),
    ]
    world, workers = 2, 2
    for source in sources:
        everything = [d.doc_id for d in source.documents(0, 1)]
        shares = [[d.doc_id for d in source.documents(rank * workers + w, world * workers)]
                  for rank in range(world) for w in range(workers)]
        flat = sum(shares, [])
        assert len(flat) == len(set(flat)) == len(everything), source.name
        assert set(flat) == set(everything) and all(shares), source.name
