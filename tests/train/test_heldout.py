"""Held-out measurement: the re-mentions beyond the window are found where a hand-built
stream puts them, and their loss is the mean over exactly those tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data import eval_windows
from model import ModelConfig, build_model
from train.heldout import beyond_window, evaluate

EOT = 0


def stream_positions(masks: list[torch.Tensor], b: int = 0) -> list[int]:
    """Stream positions of the marked targets of stream b (target t of window i is at i * T + t + 1)."""
    T = masks[0].shape[1]
    return [i * T + t + 1 for i, m in enumerate(masks) for t in m[b].nonzero().flatten().tolist()]


def test_re_mentions_beyond_the_window_are_where_the_stream_puts_them():
    a = [7, 8, *range(100, 110), 7, 8, *range(200, 203), 7, 8, 9]  # (7, 8) at 1, 13 (12 back), 18 (5 back)
    b = [*range(300, 310), 7, 8, 9]  # a new document: (7, 8) 14 back, but in the last one
    windows = eval_windows(iter([a, b]), EOT, batch_size=1, seq_length=4, max_tokens=10_000)
    masks = beyond_window(windows, EOT, reach=5)
    assert [m.shape for m in masks] == [(1, 4)] * len(windows)
    assert stream_positions(masks) == [13]  # 12 back counts; 5 back is inside the window
    assert stream_positions(beyond_window(windows, EOT, reach=4)) == [13, 18]
    assert stream_positions(beyond_window(windows, EOT, reach=12)) == []


def test_each_stream_keeps_its_own_documents():
    doc = [3, 4, *range(50, 60), 3, 4]  # (3, 4) again 12 tokens on; 15 tokens with its end-of-text
    other = [*range(60, 76)]  # 17 with its end: each stream is 32 tokens, starting with doc
    windows = eval_windows(iter([doc, other, doc, other, [90, 91]]), EOT, batch_size=2, seq_length=8,
                           max_tokens=10_000)
    masks = beyond_window(windows, EOT, reach=6)
    assert windows[0][:, :2].tolist() == [[3, 4], [3, 4]]  # both streams start with a copy of doc
    assert stream_positions(masks, 0) == [13]
    assert stream_positions(masks, 1) == [13]
    assert sum(int(m.sum()) for m in masks) == 2


def test_the_loss_over_re_mentions_is_the_mean_over_those_tokens():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="transformer", d_model=32, n_layers=1, n_heads=2), vocab_size=128).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 20, (300,), generator=g).tolist() for _ in range(3)]  # a small vocabulary repeats pairs
    windows = eval_windows(iter(docs), EOT, batch_size=2, seq_length=16, max_tokens=10_000)
    masks = beyond_window(windows, EOT, reach=16)
    row = evaluate(model, windows, EOT, torch.device("cpu"), masks={"beyond_window": masks})
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten(), reduction="none")
                  .view(w.shape[0], -1) for w in windows]
    picked = torch.cat([loss[m] for loss, m in zip(losses, masks)])
    assert row["beyond_window_tokens"] == picked.numel() > 0
    assert abs(row["beyond_window_loss"] - picked.mean().item()) < 1e-5
    assert abs(row["eval_loss"] - torch.cat([x.flatten() for x in losses]).mean().item()) < 1e-5


def test_the_loss_at_each_temperature_divides_the_logits_by_it():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="transformer", d_model=32, n_layers=1, n_heads=2), vocab_size=128).eval()
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(1, 128, (200,), generator=g).tolist() for _ in range(2)]
    windows = eval_windows(iter(docs), EOT, batch_size=2, seq_length=16, max_tokens=10_000)
    row = evaluate(model, windows, EOT, torch.device("cpu"), temperatures=(0.5, 1.0, 2.0))
    assert set(row["temperature_loss"]) == {0.5, 1.0, 2.0}
    assert abs(row["temperature_loss"][1.0] - row["eval_loss"]) < 1e-5
    with torch.no_grad():
        for t in (0.5, 2.0):
            want = torch.cat([F.cross_entropy(model(w[:, :-1]).logits.flatten(0, 1) / t, w[:, 1:].flatten(),
                                              reduction="none") for w in windows]).mean().item()
            assert abs(row["temperature_loss"][t] - want) < 1e-5
    assert "temperature_loss" not in evaluate(model, windows, EOT, torch.device("cpu"))
