"""Every numeric preset key has a valid range on its field, and the accepted vocabulary
(other names for our keys) loads with notices."""
import dataclasses
import json
import typing

import pytest

from presets import PresetError, load_preset, preset_from_dict
from presets.rules import field_ranges
from presets.schema import Preset
from tests.conftest import ROOT

BASE = {"name": "x", "data": {"sources": ["my_data"]}}


def numeric_fields(cls, seen=None):
    """(class, field) for every int/float field reachable from cls."""
    seen = seen if seen is not None else set()
    if cls in seen:
        return
    seen.add(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(tp) or (tp,)
        for arg in args + tuple(a for t in args for a in typing.get_args(t)):
            if dataclasses.is_dataclass(arg):
                yield from numeric_fields(arg, seen)
        if any(a in (int, float) for a in args):
            yield cls, f.name


def test_every_numeric_key_has_a_range():
    missing = [f"{c.__name__}.{k}" for c, k in numeric_fields(Preset) if k not in field_ranges(c)]
    assert not missing, missing


def problems(raw) -> str:
    with pytest.raises(PresetError) as e:
        preset_from_dict(raw, "p.json")
    return str(e.value)


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "grad_clip", -1, "train.grad_clip: must be in (0, 1e6], got -1"),
    ("train", "lr", float("nan"), "train.lr: expected a finite number, got NaN (a number)"),
    ("train", "lr", float("inf"), "train.lr: expected a finite number, got Infinity (a number)"),
    ("model", "n_heads", 0, "model.n_heads: must be in [1, 512], got 0"),
    ("model", "d_model", 65536, "model.d_model: must be in [8, 16384], got 65536"),
    ("tokenizer", "vocab_size", 1e9, "tokenizer.vocab_size: must be in [257, 1048576], got 1e+09"),
    ("train", "seq_length", 1e9, "train.seq_length: must be in [1, 1048576], got 1e+09"),
    ("data", "eval_fraction", 0.7, "data.eval_fraction: must be in [0, 0.5), got 0.7"),
])
def test_out_of_range_and_non_finite_values_are_refused(section, key, value, expected):
    msg = problems({**BASE, section: {key: value}})
    assert msg == f"p.json: {expected}", msg


SEED = {"name": "qa_plus_wiki",
        "model": {"hidden_size": 256, "num_layers": 3, "num_heads": 4, "seq_length": 256},
        "train": {"per_gpu_batch_size": 128, "accumulation_steps": 4, "eval_tokens": 2000000},
        "data": {"sources": [{"type": "hf", "dataset": "sentence-transformers/natural-questions", "split": "train",
                              "fields": ["question", "answer"], "format": "Q: {question}\nA: {answer}"}, "wikipedia"],
                 "mix_strategy": "round_robin", "min_text_length": 50},
        "auxiliary": {"enable_policy": True, "enable_value": True, "enable_dynamics": True,
                      "enable_span_contrastive": True, "policy_kl_weight": 0.05, "value_weight": 0.05,
                      "dynamics_weight": 0.05, "span_contrastive_weight": 0.05, "span_mask_fraction": 0.15,
                      "span_contrastive_temperature": 0.07, "span_l2_normalize": True,
                      "enable_adaptive_sources": True, "adaptive_interval_tokens": 5000000,
                      "adaptive_min_weight": 0.5, "adaptive_max_weight": 3.0, "adaptive_smoothing": 0.9}}


def test_a_preset_in_the_other_vocabulary_loads_with_its_meaning(tmp_path):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(SEED))
    preset, notices = load_preset(path)
    m, t, a = preset.model, preset.train, preset.auxiliary
    assert (m.d_model, m.n_layers, m.n_heads, t.seq_length) == (256, 3, 4, 256)
    assert (t.batch_size, t.grad_accum_steps, t.eval_tokens) == (128, 4, 2_000_000)
    assert a.span_temperature == 0.07 and a.policy_kl_weight == a.value_weight == 0.05
    assert "model.hidden_size: read as model.d_model (this trainer's name for it)" in notices
    assert "model.seq_length: read as train.seq_length (this trainer's name for it)" in notices


def test_a_head_switch_sets_its_weight():
    on, notices = preset_from_dict({**BASE, "auxiliary": {"enable_value": True}}, "p.json")
    assert on.auxiliary.value_weight == 0.05 and any("enable_value" in n for n in notices)
    off, notices = preset_from_dict({**BASE, "auxiliary": {"enable_value": False, "value_weight": 0.3}}, "p.json")
    assert off.auxiliary.value_weight == 0.0 and any("turns the head off" in n for n in notices)
    kept, _ = preset_from_dict({**BASE, "auxiliary": {"enable_value": True, "value_weight": 0.2}}, "p.json")
    assert kept.auxiliary.value_weight == 0.2


def test_a_key_and_its_alias_that_disagree_are_named_both():
    msg = problems({**BASE, "model": {"hidden_size": 256, "d_model": 128}})
    assert "model.hidden_size: 256 conflicts with model.d_model: 128" in msg
    same, _ = preset_from_dict({**BASE, "model": {"hidden_size": 128, "d_model": 128}}, "p.json")
    assert same.model.d_model == 128


def test_real_presets_still_validate():
    for path in sorted((ROOT / "configs").glob("*.json")):
        load_preset(path)


def test_a_preset_in_the_other_vocabulary_trains_and_logs_all_four_auxiliary_terms(tmp_path, corpus):
    import copy

    from train import train

    raw = copy.deepcopy(SEED)
    raw["data"]["sources"] = [{"type": "text", "path": str(corpus / "books"), "name": "books"},
                              {"type": "hf", "dataset": "json", "data_files": str(corpus / "qa" / "*.jsonl"),
                               "fields": ["question", "answer"], "format": "Q: {question}\nA: {answer}"}]
    # the seed's shapes, with a CPU-sized batch and context for the test
    raw["model"].update(hidden_size=64, num_heads=2, seq_length=32)
    raw["train"].update(per_gpu_batch_size=4, accumulation_steps=1, eval_tokens=1024, log_every_steps=2)
    raw["tokenizer"] = {"type": "bpe", "vocab_size": 512, "train_chars": 200_000}
    preset, notices = preset_from_dict(raw, "seed.json")
    assert any("hidden_size" in n for n in notices)
    result = train(preset, budget=2048, out_dir=tmp_path)
    assert result.finished
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows if r.get("kind") == "train" for k in r if k.startswith("loss/")}
    assert len(logged) == 4, logged  # policy, value, dynamics, span contrastive
