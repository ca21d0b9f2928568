"""The picker's time estimate: measured step times are cached per model, machine and
version of model/'s code, so a faster (or slower) model is measured again, not read back."""
import json

from model import ModelConfig
from train import estimate


def test_a_timing_taken_with_other_model_code_is_measured_again(tmp_path, monkeypatch):
    cfg = ModelConfig(arch="transformer", d_model=32, n_layers=1, n_heads=2)
    cache = tmp_path / "step_times.json"
    monkeypatch.setattr(estimate, "_model_code", lambda: "older-code")
    stale = estimate._timing_key(cfg, 64, 16, "cpu") + "x8"
    cache.write_text(json.dumps({stale: 1.0}))
    monkeypatch.setattr(estimate, "_model_code", lambda: "this-code")
    rate = estimate.measured_tokens_per_s(cfg, 64, 16, 8, cache=cache, budget_s=0.05)
    assert rate != 1.0 and rate > 0
    table = json.loads(cache.read_text())
    assert table[stale] == 1.0 and len(table) == 2  # the new timing is stored beside the old one
    assert estimate.measured_tokens_per_s(cfg, 64, 16, 8, cache=cache, budget_s=0.05) == rate  # and reused
