"""Built-in dataset names expand to script-free hub datasets with the right text field,
without touching the network; the table for the README lists every one."""
import pytest

from data import BUILTIN_DATASETS, BUILTIN_TABLE, HFSourceSpec, SourceError, builtin_spec, check_format
from data.registry import make_source
from data.sources.hf import HFSource
from tests.conftest import ROOT

# legacy hub ids whose loading needs a dataset script (trust_remote_code), which we never run
SCRIPT_BASED = {"Skylion007/openwebtext", "deepmind/pg19", "openwebtext", "pg19", "c4", "wikipedia", "bookcorpus"}


def readme_rows() -> dict:
    """name -> (dataset, config, text) from the README's built-in dataset table."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[1].startswith("`") and "/" in cells[1]:
            rows[cells[0].strip("`")] = tuple(c.strip("`") for c in cells[1:4])
    return rows


def test_the_readme_documents_every_builtin_name_and_nothing_else():
    assert set(readme_rows()) == set(BUILTIN_DATASETS)


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_each_name_expands_to_a_script_free_dataset_with_the_documented_text(name):
    spec = builtin_spec(name)
    assert isinstance(spec, HFSourceSpec) and spec.type == "hf" and spec.name == name and spec.split == "train"
    owner, _, repo = spec.dataset.partition("/")
    assert owner and repo and spec.dataset not in SCRIPT_BASED  # an owner/name repo of data files
    dataset, config, text = readme_rows()[name]
    assert dataset == spec.dataset and (config == "default") == (spec.config is None)
    if spec.fields:  # multi-field records: the README shows the format, and it names only those fields
        assert check_format(spec.format, spec.fields) is None
        assert text == spec.format.replace("\n", "\\n")
    else:
        assert text == spec.text_field
    source = make_source(name)  # a bare string in data.sources
    assert isinstance(source, HFSource) and source.spec == spec and source.name == name
    assert not source.is_local() and source.needs_hub()
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
