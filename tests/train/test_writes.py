"""Nothing a run trained is lost when its checkpoints/ stops taking writes, walked through
`python main.py` (tests/writefaults.py makes the folder refuse writes: a read-only bind
mount where this machine allows one, else the refusal injected into the child).

Secondary writes (metrics.jsonl, TensorBoard) fail in one line and the run goes on;
primary ones (the in-run save, the stop save, the rotation) are retried (for a second
here: SHORT_RETRY; on a terminal Enter retries) and then go to a fallback folder, named in
one line, exit code 2; moving the file back resumes the run where it stopped."""
import errno
import io
import json
import re
import shutil
import signal
import time
from pathlib import Path

import pexpect
import pytest

from tests.sample_presets import CORPUS, tiny_preset
from tests.userpath import env, main_command, make_project, run_main
from tests.writefaults import SHORT_RETRY, ReadOnly, inject, main_with
from train.checkpoint_files import CURRENT, RUN_STATE, load_checkpoint
from train.checkpointer import load_run_state
from train.progress import human

pytestmark = pytest.mark.skipif(not (CORPUS / "books").is_dir(), reason=f"real-text corpus not found at {CORPUS}")


def wait_for(path: Path, proc, limit: float = 240.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def flat(out: str) -> str:
    """Output with the terminal's line wrapping (and colours) undone."""
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out))


def rescued(out: str) -> Path:
    """The fallback file the one-line message names."""
    found = re.search(r"is saved in (\S+run_state\.pth) instead", flat(out))
    assert found, out
    return Path(found.group(1))


def resume_from(rescued_file: Path, project: Path, budget: int) -> str:
    """Move the rescued state back as the message says, start again: it resumes at the
    rescued token count and finishes with exactly the budget. The start's output."""
    tokens = load_run_state(rescued_file)["counters"]["tokens"]
    shutil.move(rescued_file, project / "checkpoints" / RUN_STATE)
    proc = run_main(project, budget)
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert f"[resume] continuing at {human(tokens)}/{human(budget)} tokens" in out, out
    assert load_checkpoint(project / "checkpoints" / CURRENT)["tokens"] == budget
    return out


def test_read_only_in_the_middle_of_a_run_saves_it_elsewhere_and_it_resumes(tmp_path):
    project = make_project(tmp_path / "p", [tiny_preset()])
    folder, budget = project / "checkpoints", 60_000
    ro = ReadOnly(folder, tmp_path, extra=SHORT_RETRY)
    proc = main_with(project, ro.pythonpath, budget, background=True)
    try:
        wait_for(folder / RUN_STATE, proc)  # it has trained and saved once
        first_save = load_run_state(folder / RUN_STATE)["counters"]["tokens"]
        ro.make()
        out = flat(proc.communicate(timeout=300)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        ro.undo()
    assert proc.returncode == 2 and "Traceback" not in out, out
    # a secondary write that fails is said at most once (whether a metrics row falls between the
    # folder turning read-only and the next save is timing: a slow machine may save first); the
    # primary one retried, then the state elsewhere in one line
    assert out.count(f"warning: cannot write {folder / 'metrics.jsonl'} (Read-only file system)") <= 1, out
    assert "Read-only file system): retrying for 1 s" in out, out
    assert f"error: {folder} cannot be written (Read-only file system): the" in out, out
    state = load_run_state(rescued(out))
    assert state["counters"]["tokens"] > first_save  # what it trained after the folder turned read-only
    assert load_run_state(folder / RUN_STATE)["counters"]["tokens"] >= first_save  # the last save there is intact
    resume_from(rescued(out), project, budget)


def test_disk_full_at_a_checkpoint_write_saves_the_run_elsewhere_and_it_resumes(tmp_path):
    project = make_project(tmp_path / "p", [tiny_preset()])
    folder, budget = project / "checkpoints", 8192
    site = inject(tmp_path / "site", folder, errno.ENOSPC, "checkpoints", extra=SHORT_RETRY)
    proc = main_with(project, site, budget)
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert f"could not write {folder / RUN_STATE} (No space left on device): retrying for 1 s" in out, out
    assert f"error: {folder} cannot be written (No space left on device): the run, at 1,024/8,192 tokens" in out
    assert not any(".tmp" in p.name for p in folder.iterdir())  # no partial file left
    assert not (folder / RUN_STATE).exists()
    assert load_run_state(rescued(out))["counters"]["tokens"] == 1024  # the first save point: nothing trained is lost
    resume_from(rescued(out), project, budget)


def test_disk_full_at_the_rotation_saves_the_finished_run_elsewhere(tmp_path):
    """The last write of a run: the finished checkpoint. Its run state goes elsewhere, and
    the resume from it does the final evaluation and the rotation, nothing more."""
    project = make_project(tmp_path / "p", [tiny_preset(train={"checkpoint_every_tokens": 10**9})])
    folder, budget = project / "checkpoints", 2048
    site = inject(tmp_path / "site", folder, errno.ENOSPC, "checkpoints", extra=SHORT_RETRY)
    proc = main_with(project, site, budget)
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert f"could not write {folder / 'lm_next.pth'} (No space left on device)" in out, out
    assert "the finished run, at 2,048/2,048 tokens, is saved in" in out, out
    resumed = resume_from(rescued(out), project, budget)
    assert "[done] 2.0k tokens" in resumed and "[train] 128/" not in resumed  # no step trained again


def test_disk_full_at_a_metrics_write_is_said_once_and_the_run_finishes(tmp_path):
    project = make_project(tmp_path / "p", [tiny_preset()])
    folder = project / "checkpoints"
    site = inject(tmp_path / "site", folder, errno.ENOSPC, "metrics")
    proc = main_with(project, site, 4096)
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert out.count("warning: cannot write") == 1, out
    assert f"cannot write {folder / 'metrics.jsonl'} (No space left on device): the run goes on without it" in out
    assert load_checkpoint(folder / CURRENT)["tokens"] == 4096
    assert not (folder / "metrics.jsonl").exists()
    assert list((folder / "tensorboard").rglob("events.out.tfevents.*"))  # the other secondary output goes on


@pytest.mark.parametrize("answer", ["retry", "elsewhere"])
def test_terminal_enter_retries_a_failing_save_once_there_is_room(tmp_path, answer):
    """On a terminal the failing save asks: Enter retries (here after the 'disk' has room
    again, and the run finishes), s saves the run elsewhere and stops (exit code 2)."""
    project = make_project(tmp_path / "p", [tiny_preset()])
    folder, flag = project / "checkpoints", tmp_path / "full.flag"
    flag.write_text("")  # the disk is full while this file exists
    site = inject(tmp_path / "site", folder, errno.ENOSPC, "checkpoints", flag=flag)
    cmd = main_command(project, 4096)
    child = pexpect.spawn(cmd[0], cmd[1:], cwd=str(project), env=env(PYTHONPATH=str(site)), timeout=240,
                          encoding="utf-8", codec_errors="replace", dimensions=(50, 160))
    child.logfile_read = io.StringIO()
    child.expect("Preset to train")
    time.sleep(0.3)
    child.send("\r")
    child.expect("press Enter to retry")
    time.sleep(0.3)
    if answer == "retry":
        flag.unlink()  # the user made room
        child.send("\r")
        child.expect(rf"\[save\] {re.escape(str(folder / RUN_STATE))} written")
        child.expect(r"\[done\]")
    else:
        child.send("s\r")
        child.expect(pexpect.EOF)
    child.expect(pexpect.EOF)
    child.close()
    out = flat(child.logfile_read.getvalue())
    assert "Traceback" not in out, out
    if answer == "retry":
        assert child.exitstatus == 0, out
        assert load_checkpoint(folder / CURRENT)["tokens"] == 4096
    else:
        assert child.exitstatus == 2, out
        assert load_run_state(rescued(out))["counters"]["tokens"] == 1024


def test_sigterm_stop_save_on_a_full_disk_goes_elsewhere(tmp_path):
    """The stop save is a primary write too: with the disk full it ends in the fallback."""
    project = make_project(tmp_path / "p", [tiny_preset(train={"checkpoint_every_tokens": 10**9})])
    folder, flag = project / "checkpoints", tmp_path / "full.flag"
    site = inject(tmp_path / "site", folder, errno.ENOSPC, "checkpoints", flag=flag, extra=SHORT_RETRY)
    proc = main_with(project, site, 60_000, background=True)
    for line in proc.stdout:
        if re.match(r"\[train\] \S+/\S+ tokens \(", line):  # a progress line: the loop runs
            break
    flag.write_text("")
    proc.send_signal(signal.SIGTERM)
    out = flat(proc.communicate(timeout=120)[0])
    assert proc.returncode == 2 and "Traceback" not in out, out
    state = load_run_state(rescued(out))
    assert state["counters"]["tokens"] > 0
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert state["counters"]["tokens"] >= max(r["tokens"] for r in rows if r["kind"] == "train")


class Said:
    """A reporter that keeps what it was told."""

    enabled, progress = True, None

    def __init__(self):
        self.lines = []

    def log(self, message, style=None):
        self.lines.append(message)

    def warn(self, message):
        self.lines.append(f"warning: {message}")


def test_a_write_that_fails_twice_is_retried_and_said_once(tmp_path, monkeypatch):
    import train.checkpoint_files as ck

    monkeypatch.setattr(ck, "RETRY_PAUSES", (0.01,))
    tries = []

    def write():
        tries.append(1)
        if len(tries) < 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    said = Said()
    assert ck.PrimaryWrites(tmp_path, said).run(write, tmp_path / RUN_STATE) is None
    assert len(tries) == 3
    assert said.lines == [f"warning: could not write {tmp_path / RUN_STATE} (No space left on device): retrying for "
                          f"{ck.RETRY_SECONDS:g} s (free some space or make the folder writable)",
                          f"[save] {tmp_path / RUN_STATE} written"]


def test_ctrl_c_while_a_write_is_retried_goes_to_the_fallback_at_once(tmp_path, monkeypatch):
    import train.checkpoint_files as ck

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.time, "sleep", interrupted)

    def write():
        raise OSError(errno.EROFS, "Read-only file system")

    assert ck.PrimaryWrites(tmp_path, Said()).run(write, tmp_path / RUN_STATE) == "Read-only file system"


def test_the_fallback_takes_the_first_writable_place_else_says_what_is_lost(tmp_path, monkeypatch):
    import train.checkpoint_files as ck

    blocked = tmp_path / "a-file"
    blocked.write_text("")  # nothing can be made under a file
    good = tmp_path / "cache"
    state = {"model": {}, "counters": {"tokens": 3000}, "budget": 9000, "run_id": "r1"}
    folder = tmp_path / "checkpoints"
    monkeypatch.setattr(ck, "fallback_folders", lambda name: [blocked / "x", good / name])
    with pytest.raises(ck.SavedElsewhere) as e:
        ck.PrimaryWrites(folder, Said()).elsewhere(state, "No space left on device")
    place = next(good.iterdir()) / RUN_STATE
    assert f"the run, at 3,000/9,000 tokens, is saved in {place} instead" in str(e.value)
    assert f"(mv {place} {folder / RUN_STATE})" in str(e.value)
    assert load_checkpoint(place)["counters"]["tokens"] == 3000

    monkeypatch.setattr(ck, "fallback_folders", lambda name: [blocked / "x", blocked / "y"])
    ck.atomic_save({**state, "counters": {"tokens": 2000}}, folder / RUN_STATE)  # this run's last save
    with pytest.raises(ck.NothingSaved, match=r"lost: the 1,000 tokens trained since the last save; .* \(at 2,000 "
                                              r"tokens\) is kept"):
        ck.PrimaryWrites(folder, Said()).elsewhere(state, "No space left on device")
    ck.atomic_save({**state, "run_id": "an older run"}, folder / RUN_STATE)
    with pytest.raises(ck.NothingSaved, match="lost: all 3,000 tokens this run trained"):
        ck.PrimaryWrites(folder, Said()).elsewhere(state, "No space left on device")
