"""Atomic writes and the rotation: a crash at any point leaves loadable files in order."""
import errno
import os

import pytest
import torch

from train.checkpoint_files import (
    CURRENT,
    NEXT,
    PREV,
    PREV2,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    recover_rotation,
    rotate_checkpoints,
)


def ckpt(tag):
    return {"model": {"w": torch.tensor([float(tag)])}, "tag": tag}


def tag(path):
    return load_checkpoint(path)["tag"]


def test_rotation_shifts_files(tmp_path):
    for t in (1, 2, 3, 4):
        rotate_checkpoints(ckpt(t), tmp_path)
    assert (tag(tmp_path / CURRENT), tag(tmp_path / PREV), tag(tmp_path / PREV2)) == (4, 3, 2)
    assert not (tmp_path / NEXT).exists()


@pytest.mark.parametrize("done", [0, 1, 2], ids=["before-any-rename", "after-prev-to-prev2", "after-current-to-prev"])
def test_rotation_interrupted_after_each_rename_is_finished_on_start(tmp_path, done):
    for t in (1, 2, 3):
        rotate_checkpoints(ckpt(t), tmp_path)
    atomic_save(ckpt(4), tmp_path / NEXT)  # the new checkpoint is complete; then the crash
    renames = [(PREV, PREV2), (CURRENT, PREV)]
    for src, dst in renames[:done]:
        os.replace(tmp_path / src, tmp_path / dst)
    assert recover_rotation(tmp_path)
    assert (tag(tmp_path / CURRENT), tag(tmp_path / PREV), tag(tmp_path / PREV2)) == (4, 3, 2)


def test_first_run_rotation_interrupted(tmp_path):
    atomic_save(ckpt(1), tmp_path / NEXT)
    assert recover_rotation(tmp_path)
    assert tag(tmp_path / CURRENT) == 1 and not (tmp_path / PREV).exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    atomic_save(ckpt(1), tmp_path / CURRENT)

    def disk_full(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoints are intact"):
        atomic_save(ckpt(2), tmp_path / CURRENT, writer=disk_full)
    assert tag(tmp_path / CURRENT) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT]


def test_load_refuses_code_carrying_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="holds objects a safe load refuses") as e:
        load_checkpoint(path)
    assert "weights_only" not in str(e.value)  # never torch's advice to turn the safe loader off


def test_load_reports_truncated_file(tmp_path):
    atomic_save(ckpt(1), tmp_path / CURRENT)
    data = (tmp_path / CURRENT).read_bytes()
    (tmp_path / CURRENT).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="lm_current.pth"):
        load_checkpoint(tmp_path / CURRENT)
