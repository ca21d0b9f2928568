"""DocumentMixer: each strategy's proportions, set_weights switching to weighted drawing,
exact resume, filtering kept, and sources that die mid-run: retried from their position,
then dropped while the rest go on; all dead is a clear error; none opened lists each."""
from collections import Counter

import pytest

from data import (
    AllSourcesDied,
    AllSourcesFailed,
    DataConfig,
    DocumentMixer,
    HFSourceSpec,
    PdfSourceSpec,
    TextSourceSpec,
    open_sources,
)
from data.sources.base import Document

from .conftest import FlakySource, ListSource


def cfg(**kwargs) -> DataConfig:
    base = dict(eval_fraction=0.0, min_text_length=1, dedup=False, retry_backoff_s=0.0)
    base.update(kwargs)
    return DataConfig(**base)


def draw(mixer, n):
    return [mixer.next_document() for _ in range(n)]


def test_round_robin_takes_one_document_from_each_source_in_turn():
    mixer = DocumentMixer([ListSource("a", 5), ListSource("b", 50), ListSource("c", 7)], cfg())
    got = draw(mixer, 300)
    assert [i for i, _ in got] == [0, 1, 2] * 100
    assert [d.doc_id for i, d in got if i == 0][:7] == ["a:0", "a:1", "a:2", "a:3", "a:4", "a:0", "a:1"]


def test_sequential_reads_each_source_through_before_the_next():
    mixer = DocumentMixer([ListSource("a", 4), ListSource("b", 3)], cfg(mix_strategy="sequential"))
    ids = [d.doc_id for _, d in draw(mixer, 14)]
    assert ids == ["a:0", "a:1", "a:2", "a:3", "b:0", "b:1", "b:2"] * 2


def test_weighted_draws_in_proportion_to_the_weights():
    mixer = DocumentMixer([ListSource("a", 30), ListSource("b", 30), ListSource("c", 30)],
                          cfg(mix_strategy="weighted", source_weights=[1.0, 3.0, 0.0]))
    counts = Counter(i for i, _ in draw(mixer, 4000))
    assert counts[2] == 0
    assert counts[1] / 4000 == pytest.approx(0.75, abs=0.03)


def test_set_weights_switches_to_weighted_and_survives_a_restart():
    sources = [ListSource("a", 40), ListSource("b", 40)]
    mixer = DocumentMixer(sources, cfg())  # round_robin
    draw(mixer, 10)
    mixer.set_weights([1.0, 9.0])
    assert mixer.strategy == "weighted"
    saved = mixer.state_dict()
    expected = [d.doc_id for _, d in draw(mixer, 500)]
    assert Counter(e[0] for e in expected)["b"] / 500 == pytest.approx(0.9, abs=0.04)
    resumed = DocumentMixer(sources, cfg())
    resumed.load_state_dict(saved)
    assert resumed.strategy == "weighted"
    assert [d.doc_id for _, d in draw(resumed, 500)] == expected
    with pytest.raises(ValueError):
        mixer.set_weights([1.0])


def test_state_dict_resumes_exactly_mid_epoch():
    sources = [ListSource("a", 13), ListSource("b", 5)]
    mixer = DocumentMixer(sources, cfg(mix_strategy="weighted", source_weights=[2, 1], seed=3), shard=1, num_shards=2)
    draw(mixer, 17)
    saved = mixer.state_dict()
    expected = draw(mixer, 40)
    resumed = DocumentMixer(sources, cfg(mix_strategy="weighted", source_weights=[2, 1], seed=3), shard=1, num_shards=2)
    resumed.load_state_dict(saved)
    assert [(i, d.doc_id) for i, d in draw(resumed, 40)] == [(i, d.doc_id) for i, d in expected]


def test_short_duplicate_and_heldout_documents_are_filtered():
    class Docs(ListSource):
        def documents(self, shard=0, num_shards=1):
            texts = ["tiny", "a long enough document", "a  long enough\ndocument", "another long document"]
            for p, t in enumerate(texts):
                if p % num_shards == shard:
                    yield Document(t, self.name, f"d{p}")

    mixer = DocumentMixer([Docs("s", 0)], cfg(min_text_length=10, dedup=True))
    assert [d.doc_id for _, d in draw(mixer, 4)] == ["d1", "d3", "d1", "d3"]
    held = DocumentMixer([ListSource("a", 200)], cfg(eval_fraction=0.5))
    ids = {d.doc_id for _, d in draw(held, 200)}
    assert 60 < len(ids) < 140  # about half held out, by hash of the id


def test_a_transient_failure_is_retried_from_the_same_position():
    messages = []
    flaky = FlakySource("f", 20, fail_at=7, times=2)
    mixer = DocumentMixer([flaky, ListSource("g", 20)], cfg(source_retries=3), log=messages.append)
    got = [d.doc_id for i, d in draw(mixer, 40) if i == 0]
    assert got == [f"f:{p}" for p in range(20)]  # no gap, no repeat
    assert flaky.failed == 2 and sum("retry" in m for m in messages) == 2 and not mixer.dead


def test_a_source_that_keeps_failing_is_dropped_and_the_rest_go_on():
    messages = []
    mixer = DocumentMixer([FlakySource("f", 20, fail_at=3), ListSource("g", 20)], cfg(source_retries=2),
                          log=messages.append)
    got = draw(mixer, 60)
    assert [d.doc_id for i, d in got if i == 0] == ["f:0", "f:1", "f:2"]
    assert len([1 for i, _ in got if i == 1]) == 57
    assert 0 in mixer.dead and "ConnectionError" in mixer.dead[0]
    assert sum("retry" in m for m in messages) == 2 and any("dropping source f" in m for m in messages)
    assert mixer.state_dict()["dead"] == [[0, mixer.dead[0]]]


def test_when_every_source_dies_the_error_lists_them():
    mixer = DocumentMixer([FlakySource("f", 9, fail_at=1), FlakySource("g", 9, fail_at=2)], cfg(source_retries=1),
                          log=lambda _: None)
    with pytest.raises(AllSourcesDied) as died:
        draw(mixer, 20)
    assert [name for name, _ in died.value.failures] == ["f", "g"]
    assert all("ConnectionError" in reason for _, reason in died.value.failures)


def test_when_no_source_opens_each_is_listed_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("data.sources.hf.hub_status", lambda: (False, "hub unreachable (test)"))
    config = DataConfig(sources=[TextSourceSpec(type="text", path=str(tmp_path / "missing")),
                                 PdfSourceSpec(type="pdf", path=str(tmp_path)),
                                 HFSourceSpec(type="hf", dataset="allenai/c4", config="en"),
                                 "fineweb_edu"])
    logged = []
    with pytest.raises(AllSourcesFailed) as failed:
        open_sources(config, log=logged.append)
    names = [name for name, _ in failed.value.failures]
    assert names == [str(tmp_path / "missing"), str(tmp_path), "allenai/c4", "fineweb_edu"]
    reasons = [reason for _, reason in failed.value.failures]
    assert "does not exist" in reasons[0] and "no .pdf files" in reasons[1]
    assert all("hub unreachable (test)" in r for r in reasons[2:])
    assert len(logged) == 4 and all(str(failed.value).count(n) for n in names)
