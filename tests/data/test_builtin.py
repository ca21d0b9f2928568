"""Built-in dataset names expand to script-free hub datasets with the right text field,
without touching the network; the table for the README lists every one."""
import pytest

from data import BUILTIN_DATASETS, BUILTIN_TABLE, HFSourceSpec, SourceError, builtin_spec, check_format
from data.registry import make_source
from data.sources.hf import HFSource

EXPECTED = {
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
    "openwebtext": ("vietgpt/openwebtext_en", None),
    "c4": ("allenai/c4", "en"),
    "slimpajama": ("DKYoon/SlimPajama-6B", None),
    "pg19": ("emozilla/pg19", None),
    "tinystories": ("roneneldan/TinyStories", None),
    "natural_questions": ("sentence-transformers/natural-questions", "pair"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_expands_to_its_dataset(name):
    spec = builtin_spec(name)
    assert isinstance(spec, HFSourceSpec) and spec.type == "hf" and spec.name == name
    assert (spec.dataset, spec.config) == EXPECTED[name] and spec.split == "train"
    if spec.fields:
        assert check_format(spec.format, spec.fields) is None
    else:
        assert spec.text_field == "text"
    source = make_source(name)  # a bare string in data.sources
    assert isinstance(source, HFSource) and source.spec == spec and source.name == name
    assert not source.is_local()
    assert f"`{name}`" in BUILTIN_TABLE and f"`{spec.dataset}`" in BUILTIN_TABLE


def test_natural_questions_is_formatted_qa():
    spec = builtin_spec("natural_questions")
    assert spec.fields == ["query", "answer"] and spec.format == "Q: {query}\nA: {answer}"


def test_no_script_based_repos_and_unknown_names_are_refused():
    repos = {v["dataset"] for v in BUILTIN_DATASETS.values()}
    assert not repos & {"Skylion007/openwebtext", "deepmind/pg19", "openwebtext", "pg19", "c4", "wikipedia"}
    with pytest.raises(KeyError, match="fineweb_edu"):
        builtin_spec("fineweb")


def test_builtin_fails_check_offline_with_the_hub_reason(monkeypatch):
    monkeypatch.setattr("data.sources.hf.hub_status", lambda: (False, "hub unreachable (test)"))
    with pytest.raises(SourceError, match="wikimedia/wikipedia: hub unreachable"):
        make_source("wikipedia").check()
