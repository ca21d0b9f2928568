"""Bad and hostile input: fuzzed presets always get a message (never a traceback), Q/A
formats cannot reach attributes, odd text is read without crashing, a checkpoint of
another architecture is reported, not a shape error."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from presets import PresetError, load_preset, preset_from_dict
from tests.conftest import ROOT

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
REAL = [json.loads(p.read_text()) for p in sorted((ROOT / "configs").glob("*.json"))]


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def validate(raw):
    try:
        preset_from_dict(raw, "fuzz.json")
    except PresetError as e:
        assert all(p.startswith("fuzz.json: ") for p in str(e).splitlines())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_gets_a_message_not_a_traceback(raw):
    validate(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REAL), st.data())
def test_mutated_real_presets_get_a_message_not_a_traceback(preset, data):
    raw = json.loads(json.dumps(preset))
    where = data.draw(st.sampled_from([p for p in paths(raw) if p]))
    parent = raw
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        parent[where[-1]] = data.draw(json_values)
    elif isinstance(parent, dict):
        del parent[where[-1]]
    validate(raw)


@pytest.mark.parametrize("fmt", ["Q: {question.__class__}", "{question[0]}", "{question!r}", "{0}", "{}",
                                 "{question:{answer}}", "{secret}"])
def test_qa_formats_reaching_beyond_named_fields_are_rejected(tmp_path, fmt):
    raw = {"name": "qa", "data": {"sources": [{"type": "hf", "dataset": "json", "data_files": "qa.jsonl",
                                               "fields": ["question", "answer"], "format": fmt}]}}
    (tmp_path / "qa.json").write_text(json.dumps(raw))
    with pytest.raises(PresetError, match=r"data\.sources\[0\]\.format"):
        load_preset(tmp_path / "qa.json")


def test_odd_text_files_are_read_without_crashing(tmp_path):
    from data import DataConfig, TextSourceSpec, open_sources
    from data.registry import DocumentMixer

    (tmp_path / "bad_utf8.txt").write_bytes(b"caf\xe9 au lait \xff\xfe and more words here " * 20)
    (tmp_path / "nul.txt").write_bytes(b"hello\x00world " * 50)
    (tmp_path / "one_line.txt").write_bytes(b"word " * 10_000_000)  # a single 50 MB line
    cfg = DataConfig(sources=[TextSourceSpec(type="text", path=str(tmp_path), chunk_chars=8000)], eval_fraction=0)
    (source,) = open_sources(cfg)
    docs = list(source.documents())
    assert max(len(d.text) for d in docs) <= 8000
    assert sum(len(d.text) for d in docs) > 45_000_000
    assert not any("\x00" in d.text for d in docs)
    mixer = DocumentMixer([source], cfg)
    assert mixer.next_document()[1].text


def test_checkpoint_of_another_architecture_is_reported(tiny_preset, tmp_path, capsys):
    from train import train
    from train.checkpoint_files import CURRENT, load_checkpoint

    train(tiny_preset(), budget=512, out_dir=tmp_path)
    hatch = {"arch": "hatchling", "d_model": 64, "n_layers": 2, "n_heads": 2, "global_every": 2}
    train(tiny_preset(model=hatch), budget=512, out_dir=tmp_path)
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "holds a different model (transformer); this run starts from fresh weights" in said
    assert load_checkpoint(tmp_path / CURRENT)["model_config"]["arch"] == "hatchling"


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    from train.checkpoint_files import CheckpointError, load_checkpoint

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint of this trainer"):
        load_checkpoint(tmp_path / "other.pth")
