"""Fault injection (the trials of tests/faults.py, which bench/faults.py runs at a larger
count): crashes, signals, a full disk, NaNs, out-of-memory and a dying rank never lose
more than the work since the last save."""
import pytest

from tests import faults
from tests.sample_presets import CORPUS

pytestmark = pytest.mark.skipif(not (CORPUS / "books").is_dir(), reason=f"real-text corpus not found at {CORPUS}")


def survived(row):
    assert row["survived"] == row["trials"], row
    return row


def test_nan_steps_are_skipped_and_a_streak_rolls_back():
    row = survived(faults.fault_nan())
    assert row["skipped_steps"] == 5 and row["lr_scale"] == 0.5
    assert row["rolled_back_exactly"]  # token count and weights are the saved ones


@pytest.mark.parametrize("arch", ["transformer", "hatchling"])
def test_out_of_memory_halves_the_micro_batch_with_the_same_result(arch):
    row = survived(faults.fault_oom(arch))
    assert row["splits"] == 4 and row["same_result"]


def test_disk_full_during_a_save_keeps_the_previous_save():
    survived(faults.fault_enospc())


def test_sigterm_saves_exits_and_resumes():
    row = survived(faults.fault_sigterm(bound_s=120))
    assert row["data_lost_tokens"] == 0


def test_random_kill9s_never_corrupt_and_the_run_completes():
    row = faults.fault_kill9(kills=2, seed=1, budget=8192)  # bench/faults.py kills more
    assert row["survived"] == 2 and not row["problems"], row


def test_a_dying_ddp_rank_stops_the_run_instead_of_hanging():
    survived(faults.fault_ddp_rank(limit_s=240))
