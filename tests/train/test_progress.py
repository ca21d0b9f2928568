"""What a progress update writes: the metrics.jsonl row (auxiliary terms with their share
of the total loss, per-source losses, the model's metrics) and the detail line."""
import torch

from train.progress import block_summary, train_row


def test_a_train_row_carries_the_auxiliary_shares_and_the_detail_line():
    row, detail = train_row({"step": 3, "tokens": 384, "loss": 3.0, "lr": 1e-3},
                            {"books": 2.5, "qa": None}, {"loss/value": torch.tensor(1.0)},
                            {"metric/spike_rate/layer0": torch.tensor(0.1), "metric/spike_rate/layer1": 0.3})
    assert row["kind"] == "train" and (row["step"], row["tokens"], row["loss"]) == (3, 384, 3.0)
    assert row["loss_total"] == 4.0 and row["share/value"] == 0.25 and row["loss/value"] == 1.0
    assert row["source_loss"] == {"books": 2.5}  # a source without tokens in the window is left out
    assert abs(row["metric/spike_rate/layer0"] - 0.1) < 1e-6
    assert detail == "value 1 (25.0%)  spike rate 0.20"


def test_one_source_and_no_auxiliary_terms_keep_the_row_plain():
    row, detail = train_row({"loss": 2.0}, {"books": 2.0}, {}, {})
    assert row == {"kind": "train", "loss": 2.0} and detail == ""
    assert block_summary({"metric/pm_commit_rate/layer0": 0.5, "metric/em_strength/layer1": 0.25}) == \
        "  PM commits 0.50  EM strength 0.25"
