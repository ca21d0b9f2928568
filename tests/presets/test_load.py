"""Preset validation: every shipped preset is valid; broken ones get one clear message
naming the file, the key path and what was expected."""
import json
from pathlib import Path

import pytest

from presets import PresetError, load_preset
from presets.schema import TOKEN_BUDGET

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, obj) -> Path:
    p = tmp_path / "p.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def problems(tmp_path, obj) -> str:
    with pytest.raises(PresetError) as e:
        load_preset(write(tmp_path, obj))
    return str(e.value)


BASE = {"name": "x", "data": {"sources": ["some/folder"]}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_presets_are_valid(path):
    preset, _ = load_preset(path)
    assert preset.name == path.stem


def test_bad_json_names_file_line_and_column(tmp_path):
    msg = problems(tmp_path, '{"name": "x",\n "model": {"d_model": 64,}}')
    assert str(tmp_path / "p.json") in msg and "line 2" in msg and "invalid JSON" in msg


def test_unknown_key_names_path_and_suggests(tmp_path):
    msg = problems(tmp_path, {**BASE, "model": {"d_modle": 64}})
    assert "p.json: model.d_modle: unknown key; did you mean 'd_model'? (the valid keys are in README.md, `model` table)" in msg
    assert "n_layers" not in msg  # a pointer to the table, not every valid key after every mistake


def test_wrong_type_says_what_was_expected(tmp_path):
    msg = problems(tmp_path, {**BASE, "model": {"d_model": "512"}})
    assert 'model.d_model: expected an integer, got "512" (a string)' in msg
    msg = problems(tmp_path, {**BASE, "train": {"compile": 1}})
    assert "train.compile: expected true or false, got 1 (an integer)" in msg
    msg = problems(tmp_path, {**BASE, "model": {"arch": "rnn"}})
    assert 'model.arch: expected one of "transformer", "hatchling", got "rnn"' in msg


def test_source_type_and_nested_paths(tmp_path):
    msg = problems(tmp_path, {"name": "x", "data": {"sources": [{"type": "ftp", "path": "a"}]}})
    assert "data.sources[0].type: expected one of" in msg
    msg = problems(tmp_path, {"name": "x", "data": {"sources": [{"type": "text"}]}})
    assert "data.sources[0].path: missing" in msg


def test_missing_tokenizer_file_and_cross_field_rules(tmp_path):
    msg = problems(tmp_path, {**BASE, "tokenizer": {"type": "file", "path": "nope/tokenizer.json"}})
    assert "tokenizer.path: file 'nope/tokenizer.json' does not exist" in msg
    msg = problems(tmp_path, {**BASE, "model": {"d_model": 100, "n_heads": 3}})
    assert "model.d_model: must be divisible by n_heads" in msg
    msg = problems(tmp_path, {"name": "x", "data": {"sources": ["a", "b"], "mix_strategy": "weighted",
                                                    "source_weights": [1.0]}})
    assert "data.source_weights: expected 2 weights" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    msg = problems(tmp_path, {**BASE, "model": {"d_model": "x", "n_layerz": 2}, "train": {"lr": "fast"}})
    assert "model.d_model" in msg and "model.n_layerz" in msg and "train.lr" in msg


def test_train_tokens_is_ignored_with_a_notice(tmp_path):
    preset, notices = load_preset(write(tmp_path, {**BASE, "train_tokens": 5, "train": {"train_tokens": 7}}))
    assert len(notices) == 2 and all(f"{TOKEN_BUDGET:,}" in n for n in notices)
    assert "train_tokens" not in preset.to_dict()["train"]


def test_not_an_object(tmp_path):
    assert "expected a JSON object, got a list" in problems(tmp_path, [1, 2])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_hatchling_presets_gate_only_writing_by_spikes(path):
    """The configuration bench/quality.py found best (README, How the hatchling compares): every
    shipped hatchling preset builds, as the trainer builds it, Spike-KDA layers whose
    forgetting is not gated by their spikes (alpha_spike_floor 1) and whose writing is."""
    from model import build_model
    from model.spike_kda import SpikeKDA

    preset, _ = load_preset(path)
    if preset.model.arch != "hatchling":
        pytest.skip("a transformer preset")
    model = build_model(preset.model, 256, preset.auxiliary)
    layers = [m for m in model.modules() if isinstance(m, SpikeKDA)]
    assert layers and all(m.spiking and m.alpha_floor == 1.0 and m.beta_floor == 0.0 for m in layers)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_episodic_memories_have_their_own_lookup_and_give_way_by_age(path):
    """The episodic memory that recalls beyond the window on bench/mqar.py (README, What the
    memories do): every shipped preset whose phase turns it on builds it with its own lookup
    and the age discount, as the trainer builds it."""
    from model import build_model

    preset, _ = load_preset(path)  # the phase's memories on, as the trainer loads it
    if not preset.model.em_enabled:
        pytest.skip("no episodic memory in this preset's phase")
    model = build_model(preset.model, 256, preset.auxiliary)
    memories = [block.em for block in model.blocks if block.em is not None]
    assert memories and all(em.own_keys and em.age_decay == 0.95 for em in memories)
