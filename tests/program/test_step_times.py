"""The picker's time estimates: a timed preset is kept as a ratio to a reference step (so
one sitting's rows compare), a figure taken with other model code is timed again, and a
real run's speed replaces the timed figure and is marked as such."""
import json
import os
import sys

from model import ModelConfig
from program import step_times
from tests.conftest import REAL_CACHE, TEST_CACHE

TINY = ModelConfig(arch="transformer", d_model=32, n_layers=1, n_heads=2)


def test_a_timed_figure_is_a_ratio_to_the_reference_step_of_this_sitting(tmp_path, monkeypatch):
    cache = tmp_path / "step_times.json"
    rate, kind = step_times.tokens_per_s(TINY, 64, 16, 8, cache=cache)
    assert kind == "timed" and rate > 0
    entry, = json.loads(cache.read_text())["entries"].values()
    assert set(entry) == {"relative"}
    # a busier sitting: the reference runs at half the speed, and so does every estimate
    monkeypatch.setattr(step_times, "reference_tokens_per_s", lambda device: 1000.0)
    assert step_times.tokens_per_s(TINY, 64, 16, 8, cache=cache) == (entry["relative"] * 1000.0, "timed")
    monkeypatch.setattr(step_times, "reference_tokens_per_s", lambda device: 500.0)
    assert step_times.tokens_per_s(TINY, 64, 16, 8, cache=cache) == (entry["relative"] * 500.0, "timed")


def test_interleaved_rounds_cancel_a_slowdown_shared_by_both_steps(monkeypatch):
    """A machine that slows down between rounds changes both the reference's and the
    model's time alike: the ratio stays."""
    times = iter([])

    class Fake:
        def __init__(self, *a, **k):
            self.tokens = 128

        def __call__(self):
            return next(times, 0.1)

    monkeypatch.setattr(step_times, "_TimedStep", Fake)
    monkeypatch.setattr(step_times, "_reference", lambda device: Fake())
    times = iter([0.1, 0.1] + [0.2, 0.4, 0.3, 0.6, 0.1, 0.2])  # warm-ups, then (reference, model) per round
    assert step_times.relative_speed(TINY, 64, 128, 1, "cpu") == 0.5


def test_a_figure_taken_with_other_model_code_is_timed_again(tmp_path, monkeypatch):
    cache = tmp_path / "step_times.json"
    monkeypatch.setattr(step_times, "_model_code", lambda: "older-code")
    step_times.record_run_speed(TINY, 64, 16, 8, 123.0, cache=cache)
    assert step_times.tokens_per_s(TINY, 64, 16, 8, cache=cache) == (123.0, "run")
    monkeypatch.setattr(step_times, "_model_code", lambda: "this-code")
    rate, kind = step_times.tokens_per_s(TINY, 64, 16, 8, cache=cache)
    assert kind == "timed" and rate != 123.0
    assert len(json.loads(cache.read_text())["entries"]) == 2  # the new figure beside the old one


def test_a_cache_of_the_first_design_is_timed_again(tmp_path):
    cache = tmp_path / "step_times.json"
    cache.write_text(json.dumps({"{}x8": 150.0}))  # a bare tokens/s, as the first design kept it
    rate, kind = step_times.tokens_per_s(TINY, 64, 16, 8, cache=cache)
    assert kind == "timed" and json.loads(cache.read_text())["version"] == step_times.CACHE_VERSION


def test_a_real_run_teaches_the_picker_its_speed(tmp_path, tiny_preset, monkeypatch):
    """train(on_speed=...) reports the speed of a run past its first progress update, and
    the program's recorder turns it into the picker's figure for that preset."""
    from program import record_speed
    from train import train
    from train.progress import SpeedReport

    monkeypatch.setattr(SpeedReport.__init__, "__defaults__", (0.0,))  # report at the second update
    seen = []
    preset = tiny_preset(train={"log_every_steps": 1})
    train(preset, budget=1024, out_dir=tmp_path / "ck", on_speed=lambda p, tps: seen.append((p, tps)))
    assert len(seen) == 1 and seen[0][0].name == preset.name and seen[0][1] > 0
    monkeypatch.setattr(step_times, "STEP_TIMES", tmp_path / "step_times.json")
    monkeypatch.setattr(step_times.record_run_speed, "__defaults__", (tmp_path / "step_times.json",))
    record_speed(*seen[0])
    from train.memory_check import vocab_size_guess

    t = preset.train
    got = step_times.tokens_per_s(preset.model, vocab_size_guess(preset.tokenizer), t.seq_length, t.batch_size,
                                  cache=tmp_path / "step_times.json")
    assert got == (seen[0][1], "run")


def test_the_test_run_keeps_its_caches_out_of_the_users_home():
    assert os.environ["XDG_CACHE_HOME"] == str(TEST_CACHE)
    assert step_times.STEP_TIMES.is_relative_to(TEST_CACHE) and not step_times.STEP_TIMES.is_relative_to(REAL_CACHE)
    # and a subprocess (main.py run by a test) inherits it
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['XDG_CACHE_HOME'])"],
                         capture_output=True, text=True).stdout.strip()
    assert out == str(TEST_CACHE)
