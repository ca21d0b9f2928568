"""The training loop on real text: loss falls, an interrupted run resumes exactly, the
end-of-run rotation keeps the order, a damaged checkpoint falls back, the tokenizer is
stored and reused."""
import json
import math

import pytest
import torch

from model.spike_kda import SpikeKDA
from program.first_question import load_finished
from tests.conftest import InterruptAt
from tests.model.helpers import tensors
from train import train
from train.checkpoint_files import CURRENT, PREV, PREV2, RUN_STATE, load_checkpoint
from train.progress import Reporter


def rows(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


class DetailRecorder(Reporter):
    """Keeps the detail line of every progress update."""

    def __init__(self):
        super().__init__(enabled=False)
        self.details = []

    def update(self, tokens, loss, lr, tokens_per_s, detail=""):
        self.details.append(detail)


HATCHLING = {"arch": "hatchling", "d_model": 64, "n_layers": 2, "n_heads": 2, "global_every": 2, "wm_window": 64,
             "chunk_size": 16, "alpha_spike_floor": 1.0}  # as every shipped hatchling preset


@pytest.mark.parametrize("arch", ["transformer", "hatchling"])
def test_loss_falls_on_real_text_and_checkpoints_appear(tiny_preset, tmp_path, arch):
    preset = tiny_preset(train={"log_every_steps": 10}, **({"model": HATCHLING} if arch == "hatchling" else {}))
    result = train(preset, budget=48_000, out_dir=tmp_path)
    assert result.finished and result.tokens == 48_000
    losses = [r["loss"] for r in rows(tmp_path, "train")]
    assert losses[-1] < losses[0] - 1.0, losses
    assert rows(tmp_path, "eval")[-1]["eval_loss"] < 6.0  # ln(512) = 6.24: better than uniform
    assert all(k in rows(tmp_path, "train")[0] for k in ("tokens", "loss", "lr", "tokens_per_s"))
    assert (tmp_path / CURRENT).exists()
    assert not (tmp_path / RUN_STATE).exists()
    kernels = rows(tmp_path, "kernels")  # what ran for each fast op, recorded once
    assert (len(kernels) == 1 and "lif_modulate" in kernels[0]) if arch == "hatchling" else not kernels
    if arch == "hatchling":  # the preset's spike floor reaches the saved model and the one loaded back
        assert load_checkpoint(tmp_path / CURRENT)["model_config"]["alpha_spike_floor"] == 1.0
        layers = [m for m in load_finished(tmp_path / CURRENT).model.modules() if isinstance(m, SpikeKDA)]
        assert layers and all(m.alpha_floor == 1.0 for m in layers)


def test_budget_is_exact_when_steps_do_not_divide_it(tiny_preset, tmp_path):
    result = train(tiny_preset(), budget=1000, out_dir=tmp_path)  # 128 tokens per step
    assert result.tokens == 1000 and result.steps == 8
    assert load_checkpoint(tmp_path / CURRENT)["tokens"] == 1000


@pytest.mark.parametrize("arch", ["transformer", "hatchling"])
def test_interrupted_run_resumes_exactly(tiny_preset, tmp_path, arch):
    budget = 6_400  # 50 steps of 128 tokens
    preset = tiny_preset(train={"log_every_steps": 1}, **({"model": HATCHLING} if arch == "hatchling" else {}))
    straight = train(preset, budget=budget, out_dir=tmp_path / "a")
    stopped = train(preset, budget=budget, out_dir=tmp_path / "b", reporter=InterruptAt(2_560))
    assert not stopped.finished and (tmp_path / "b" / RUN_STATE).exists()
    saved = load_checkpoint(tmp_path / "b" / RUN_STATE)
    assert saved["counters"]["tokens"] == stopped.tokens == 2_560
    carried = saved["ranks"][0]["carried"]["value"]
    assert (carried is not None) == (arch == "hatchling")  # recurrent state is part of the save
    resumed = train(preset, budget=budget, out_dir=tmp_path / "b", resume=True)
    assert resumed.finished and resumed.tokens == budget and resumed.steps == straight.steps
    a = load_checkpoint(tmp_path / "a" / CURRENT)["model"]
    b = load_checkpoint(tmp_path / "b" / CURRENT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    # the same batches were seen: per-step losses after the resume point match
    la = {r["step"]: r["loss"] for r in rows(tmp_path / "a", "train")}
    lb = {r["step"]: r["loss"] for r in rows(tmp_path / "b", "train")}
    assert all(la[s] == lb[s] for s in la)



def test_stop_at_saves_points_along_one_schedule(tiny_preset, tmp_path):
    """train(stop_at=N) stops at N tokens as an interrupted run; its save loads as a model,
    and resuming to the budget gives the weights of the run that never stopped."""
    preset, budget = tiny_preset(), 3_840  # 30 steps of 128 tokens
    straight = train(preset, budget=budget, out_dir=tmp_path / "a")
    first = train(preset, budget=budget, out_dir=tmp_path / "b", stop_at=1_280)
    assert not first.finished and first.tokens == 1_280 and first.stop_signal is None
    point = load_finished(tmp_path / "b" / RUN_STATE)  # a point of the curve is evaluated from the save
    assert point.model is not None and load_checkpoint(tmp_path / "b" / RUN_STATE)["budget"] == budget
    second = train(None, budget=budget, out_dir=tmp_path / "b", resume=True, stop_at=2_000)
    assert not second.finished and second.tokens == 2_048  # the first step boundary at or past it
    last = train(None, budget=budget, out_dir=tmp_path / "b", resume=True, stop_at=budget)
    assert last.finished and last.steps == straight.steps
    a = load_checkpoint(tmp_path / "a" / CURRENT)["model"]
    b = load_checkpoint(tmp_path / "b" / CURRENT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_when_a_source_is_gone_says_so_and_keeps_the_save(tiny_preset, corpus, tmp_path):
    """An interrupted run whose data folder was removed before the resume stops with one
    message naming it (not an error deep in a training step), and its save is untouched."""
    import shutil

    from train import TrainError

    extra = tmp_path / "extra"
    shutil.copytree(corpus / "books", extra)
    preset = tiny_preset(data={"sources": [{"type": "text", "path": str(corpus / "books"), "name": "books"},
                                           {"type": "text", "path": str(extra), "name": "extra"}]})
    out = tmp_path / "run"
    stopped = train(preset, budget=6_400, out_dir=out, reporter=InterruptAt(1_280))
    assert not stopped.finished
    before = (out / RUN_STATE).read_bytes()
    shutil.rmtree(extra)
    with pytest.raises(TrainError, match="extra cannot be opened now"):
        train(None, budget=6_400, out_dir=out, resume=True)
    assert (out / RUN_STATE).read_bytes() == before

def test_rotation_order_after_runs(tiny_preset, tmp_path):
    preset = tiny_preset()
    stamps = []
    for _ in range(3):
        train(preset, budget=512, out_dir=tmp_path)
        stamps.append(load_checkpoint(tmp_path / CURRENT)["finished_at"])
    assert load_checkpoint(tmp_path / PREV)["finished_at"] == stamps[1]
    assert load_checkpoint(tmp_path / PREV2)["finished_at"] == stamps[0]
    train(preset, budget=512, out_dir=tmp_path)
    assert load_checkpoint(tmp_path / PREV2)["finished_at"] == stamps[1]  # the oldest dropped out


def test_damaged_current_falls_back_to_prev(tiny_preset, tmp_path, capsys):
    preset = tiny_preset()
    train(preset, budget=512, out_dir=tmp_path)
    train(preset, budget=512, out_dir=tmp_path)
    prev_weights = load_checkpoint(tmp_path / PREV)["model"]
    (tmp_path / CURRENT).write_bytes(b"PK\x03\x04 not really a checkpoint")
    from train.checkpoint_files import load_latest

    warnings = []
    name, ckpt = load_latest(tmp_path, warn=warnings.append)
    assert name == PREV and "lm_current.pth" in warnings[0]
    assert all(torch.equal(ckpt["model"][k], prev_weights[k]) for k in prev_weights)
    train(preset, budget=512, out_dir=tmp_path)  # a new run continues from lm_prev.pth
    assert "continuing from lm_prev.pth" in " ".join(capsys.readouterr().out.split())


def test_tokenizer_is_stored_and_reused(tiny_preset, tmp_path, capsys):
    train(tiny_preset(), budget=512, out_dir=tmp_path)
    first = load_checkpoint(tmp_path / CURRENT)["tokenizer"]
    assert first["spec"]["type"] == "bpe" and '"<|endoftext|>"' in first["json"]
    # the preset now asks for another vocabulary: the stored one is kept, with a warning
    train(tiny_preset(tokenizer={"vocab_size": 1024}), budget=512, out_dir=tmp_path)
    assert load_checkpoint(tmp_path / CURRENT)["tokenizer"]["json"] == first["json"]
    assert "keeping the tokenizer stored in lm_current.pth" in " ".join(capsys.readouterr().out.split())


def test_adaptive_source_weights_follow_the_loss(corpus, tmp_path):
    from tests.conftest import tiny_preset_dict
    from train import preset_from_dict

    raw = tiny_preset_dict(corpus / "books")
    raw["data"]["sources"] = [{"type": "text", "path": str(corpus / "books" / "tinyshakespeare.txt"), "name": "plays"},
                              {"type": "text", "path": str(corpus / "books" / "war_and_peace.txt"), "name": "novel"}]
    raw["auxiliary"] = {"enable_adaptive_sources": True, "adaptive_interval_tokens": 512,
                        "adaptive_min_weight": 0.5, "adaptive_max_weight": 2.0, "adaptive_smoothing": 0.5}
    preset, _ = preset_from_dict(raw, "adaptive")
    train(preset, budget=4096, out_dir=tmp_path)
    updates = rows(tmp_path, "source_weights")
    assert len(updates) >= 6
    for row in updates:
        assert all(0.5 <= w <= 2.0 for w in row["weights"].values())
    last = updates[-1]
    harder = max(last["source_loss"], key=last["source_loss"].get)
    easier = min(last["source_loss"], key=last["source_loss"].get)
    assert last["weights"][harder] > last["weights"][easier]


@pytest.mark.parametrize("change", [{"data": {"num_workers": 1}}, {"model": {"dropout": 0.1}}],
                         ids=["background_data_workers", "dropout"])
def test_resume_is_exact_with(tiny_preset, tmp_path, change):
    """Background data workers replay their position; dropout's draws continue the saved
    random generators."""
    preset = tiny_preset(**change)
    straight = train(preset, budget=2048, out_dir=tmp_path / "a")
    stopped = train(preset, budget=2048, out_dir=tmp_path / "b", reporter=InterruptAt(1024))
    assert not stopped.finished
    train(preset, budget=2048, out_dir=tmp_path / "b", resume=True)
    a = load_checkpoint(tmp_path / "a" / CURRENT)["model"]
    b = load_checkpoint(tmp_path / "b" / CURRENT)["model"]
    assert straight.finished and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("phase, em_keys", [("B", "attention"), ("C", "attention"), ("E", "attention"), ("E", "own")])
def test_memory_phases_train_and_lifelong_keeps_memory(tiny_preset, tmp_path, phase, em_keys, capsys):
    model = {**HATCHLING, "plasticity_span": 8, "pm_slots": 4, "em_slots": 8, "em_keys": em_keys,
             "em_age_decay": 0.95 if em_keys == "own" else 1.0}  # "own" as the memory presets ship it
    preset = tiny_preset(model=model, train={"phase": phase})
    assert preset.model.pm_enabled and preset.model.em_enabled == (phase != "B")
    assert preset.model.lifelong == (phase == "E")
    shown = DetailRecorder()
    result = train(preset, budget=2048, out_dir=tmp_path, reporter=shown)
    uniform = math.log(preset.tokenizer.vocab_size)  # the loss of guessing every token equally likely
    assert result.finished and result.eval["eval_loss"] < uniform - 0.3
    metrics = rows(tmp_path, "train")[-1]
    assert {"metric/pm_commit_rate/layer0", "metric/pm_strength/layer1"} <= set(metrics)
    assert ("metric/em_write_rate/layer1" in metrics) == (phase != "B")  # EM lives in the WM block
    # the progress display's detail line carries the memory figures too
    assert "spike rate" in shown.details[-1] and "PM commits" in shown.details[-1]
    assert ("EM writes" in shown.details[-1]) == (phase != "B")
    memory = load_checkpoint(tmp_path / CURRENT)["memory"]
    assert (memory is not None) == (phase == "E")
    if phase == "E":  # the next lifelong run starts from the stored memory contents, tensor for tensor
        from train.loop import Trainer

        nxt = Trainer(preset, 512, tmp_path, resume=False, reporter=None)
        nxt.setup()
        restored = tensors(nxt.model.memory_state(nxt.carried.value))
        stored = tensors(memory)
        assert restored and len(restored) == len(stored)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(restored, stored))
        assert any(bool(b.abs().sum() > 0) for b in stored)  # there was something to carry


def test_em_keys_takes_one_of_its_two_values(tmp_path):
    from train import PresetError, preset_from_dict

    with pytest.raises(PresetError, match='model.em_keys: expected one of "attention", "own", got "mine"'):
        preset_from_dict({"name": "x", "model": {"arch": "hatchling", "em_keys": "mine"}, "train": {"phase": "C"},
                          "data": {"sources": ["a"]}}, "x.json")


def test_phases_need_hatchling(tmp_path):
    from train import PresetError, preset_from_dict

    with pytest.raises(PresetError, match='train.phase: phase B .* needs model.arch "hatchling"'):
        preset_from_dict({"name": "x", "train": {"phase": "B"}, "data": {"sources": ["a"]}}, "x.json")
