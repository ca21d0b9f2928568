"""Every path a user walks, walked the way the user walks it: `python main.py` in a
project folder of its own, answering the questions on a pseudo-terminal, or with no
terminal at all (CI, a pipe, torchrun workers). Nothing is handed in but a smaller token
budget (tests/userpath.py)."""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pexpect
import pytest
import torch

from tests.sample_presets import CORPUS, tiny_preset
from tests.userpath import make_project, run_main, spawn_main, start_main
from train.checkpoint_files import CURRENT, RUN_STATE, atomic_save, load_checkpoint
from train.progress import human

pytestmark = pytest.mark.skipif(not (CORPUS / "books").is_dir(), reason=f"real-text corpus not found at {CORPUS}")

PHASES = [("transformer", "A"), ("hatchling", "A"), ("hatchling", "B"), ("hatchling", "C"), ("hatchling", "E")]


def wait_for(path, proc=None, limit=240.0):
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc is None or proc.poll() is None, proc.stdout.read() if proc else ""
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def metrics(project):
    return [json.loads(line) for line in (project / "checkpoints" / "metrics.jsonl").read_text().splitlines()]


def stop_after_first_save(project, budget, sig=signal.SIGINT):
    """Start a run with no terminal and stop it with `sig` once it has saved; (rc, output)."""
    proc = start_main(project, budget)
    wait_for(project / "checkpoints" / RUN_STATE, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.mark.parametrize("arch,phase", PHASES)
def test_no_terminal_stop_then_restart_resumes_where_it_stopped(tmp_path, arch, phase):
    project = make_project(tmp_path, [tiny_preset(arch=arch, train={"phase": phase})])
    rc, out = stop_after_first_save(project, budget=60_000)
    assert rc == 130 and "[stop] saved the run at" in out and "Traceback" not in out, out
    saved = load_checkpoint(project / "checkpoints" / RUN_STATE)
    # the restart takes the default answer, "resume", and continues at the saved token count
    proc = start_main(project, budget=60_000)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[resume] continuing at" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out2 = "".join(lines) + rest
    tokens = human(saved["counters"]["tokens"])
    assert f"no terminal on stdin: resuming the interrupted run of '00_tiny' at {tokens}/60k tokens" in out2, out2
    assert f"step {saved['counters']['step']}" in out2 and "Traceback" not in out2, out2
    assert proc.returncode in (143, 0), out2  # 143: SIGTERM saved it again (0 only if it finished first)
    after = (load_checkpoint(project / "checkpoints" / RUN_STATE)["counters"] if proc.returncode
             else load_checkpoint(project / "checkpoints" / CURRENT))
    assert after["tokens"] >= saved["counters"]["tokens"]
    rows = metrics(project)
    starts = [r for r in rows if r["kind"] == "run_start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[0]["run"] == starts[1]["run"]
    assert all("run" in r for r in rows)


def test_terminal_ctrl_c_then_enter_resumes_and_finishes(tmp_path):
    """Arrow down to the second preset, train, Ctrl-C; start again, Enter on the resume
    question: the run continues from its save and finishes with exactly its budget."""
    project = make_project(tmp_path, [tiny_preset("00_tiny"), tiny_preset("01_hatch", arch="hatchling")])
    budget = 24_000
    child = spawn_main(project, budget)
    child.expect("Preset to train")
    time.sleep(0.3)
    child.send("\x1b[B")  # arrow down: 01_hatch
    time.sleep(0.3)
    child.send("\r")
    child.expect(r"\[model\] hatchling")
    wait_for(project / "checkpoints" / RUN_STATE)
    child.sendintr()
    child.expect(r"\[stop\] saved the run at")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.logfile_read.getvalue()
    saved = load_checkpoint(project / "checkpoints" / RUN_STATE)
    assert saved["preset"]["name"] == "01_hatch"

    child = spawn_main(project, budget)
    child.expect("Resume the interrupted run of '01_hatch'")
    time.sleep(0.3)
    child.send("\r")
    child.expect(rf"\[resume\] continuing at .* step {saved['counters']['step']}")
    child.expect(r"\[done\]", timeout=600)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert load_checkpoint(project / "checkpoints" / CURRENT)["tokens"] == budget
    assert not (project / "checkpoints" / RUN_STATE).exists()


@pytest.fixture(scope="module")
def interrupted_once(tmp_path_factory):
    """One project whose run main.py stopped (Ctrl-C) after its first save."""
    project = make_project(tmp_path_factory.mktemp("interrupted"), [tiny_preset()])
    assert stop_after_first_save(project, budget=60_000)[0] == 130
    return project


@pytest.fixture
def interrupted_project(interrupted_once, tmp_path):
    """A fresh copy of `interrupted_once` for a test to answer, damage or edit."""
    return Path(shutil.copytree(interrupted_once, tmp_path / "project"))


def answer_resume_question(project, keys: str):
    """Start main.py on a pty, answer the resume question with `keys`; (child, run_state bytes before)."""
    before = (project / "checkpoints" / RUN_STATE).read_bytes()
    child = spawn_main(project)
    child.expect("Resume the interrupted run")
    time.sleep(0.3)
    child.send(keys)
    return child, before


def test_terminal_no_to_resume_leads_to_the_picker_and_ctrl_c_there_keeps_the_run(interrupted_project):
    project = interrupted_project
    child, before = answer_resume_question(project, "n")
    child.expect("Preset to train")
    time.sleep(0.3)
    child.send("\x03")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.logfile_read.getvalue()
    assert (project / "checkpoints" / RUN_STATE).read_bytes() == before  # nothing lost


def test_terminal_ctrl_c_at_the_resume_question_exits_quietly(interrupted_project):
    project = interrupted_project
    child, before = answer_resume_question(project, "\x03")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.logfile_read.getvalue()
    assert (project / "checkpoints" / RUN_STATE).read_bytes() == before


def test_a_damaged_run_state_is_reported_and_a_new_run_starts(interrupted_project):
    project = interrupted_project
    (project / "checkpoints" / RUN_STATE).write_bytes(os.urandom(4096))
    proc = run_main(project, budget=2048)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "an interrupted run cannot be resumed" in out and "damaged" in out and "Traceback" not in out
    assert load_checkpoint(project / "checkpoints" / CURRENT)["tokens"] == 2048


@pytest.mark.parametrize("edit,expected", [
    (lambda s: s["preset"]["model"].update(arch="hatchling"), "holds weights that do not fit its own stored model"),
    (lambda s: s.pop("ranks"), "is not an interrupted run of this trainer (it lacks ranks)"),
    (lambda s: s.update(format=99), "is an interrupted run in format 99, which this version of the trainer cannot "
                                    "read (it reads format 2)"),
])
def test_a_run_state_that_cannot_resume_here_is_refused_and_kept(interrupted_project, edit, expected):
    project = interrupted_project
    path = project / "checkpoints" / RUN_STATE
    state = load_checkpoint(path)
    edit(state)
    atomic_save(state, path)
    before = path.read_bytes()
    proc = run_main(project)
    out = " ".join((proc.stdout + proc.stderr).split())  # as one line, whatever the console's width
    if "lacks" in expected:  # not resumable at all: reported, and a new run could start
        assert expected in out and "Traceback" not in out, out
        return
    assert proc.returncode == 2 and expected in out and "Traceback" not in out, out
    assert path.read_bytes() == before


def test_a_damaged_lm_current_is_reported_and_the_run_starts_fresh(tmp_path):
    project = make_project(tmp_path, [tiny_preset()])
    (project / "checkpoints").mkdir()
    junk = os.urandom(2048)
    (project / "checkpoints" / CURRENT).write_bytes(junk)
    proc = run_main(project, budget=1024)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "no other finished checkpoint: this run starts from fresh weights" in out, out
    assert "weights_only" not in out and "falling back" not in out and "Traceback" not in out
    assert load_checkpoint(project / "checkpoints" / CURRENT)["tokens"] == 1024  # rotated in; the junk is lm_prev


def test_an_invalid_preset_marks_only_its_own_row(tmp_path):
    bad = tiny_preset("50_bad", model={"n_heads": 0})
    project = make_project(tmp_path, [tiny_preset(), bad])
    proc = run_main(project, budget=1024)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert "invalid: model.n_heads: must be in [1, 512], got 0" in out


HOSTILE = {
    "huge_model": ({"model": {"d_model": 16384, "n_layers": 512}}, "needs about"),
    "huge_sequence": ({"train": {"seq_length": 1048576, "batch_size": 64}}, "needs about"),
    "out_of_range_width": ({"model": {"d_model": 65536}}, "model.d_model: must be in [8, 16384], got 65536"),
    "huge_vocab": ({"tokenizer": {"vocab_size": 1e9}}, "tokenizer.vocab_size: must be in [257, 1048576]"),
    "gradient_ascent": ({"train": {"grad_clip": -1}}, "train.grad_clip: must be in (0, 1e6], got -1"),
    "nan_lr": ('NaN', "train.lr: expected a finite number, got NaN"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_presets_end_in_one_message_and_rc_2(tmp_path, case):
    change, expected = HOSTILE[case]
    if change == "NaN":  # JSON as Python reads it accepts NaN: written as text
        raw = json.dumps(tiny_preset()).replace('"lr": 0.003', '"lr": NaN')
        project = make_project(tmp_path, {"00_tiny": raw})
    else:
        project = make_project(tmp_path, [tiny_preset(**change)])
    proc = run_main(project)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert expected in out and "Traceback" not in out, out
    assert not (project / "checkpoints" / CURRENT).exists()


def test_a_folder_with_nothing_long_enough_stops_before_training(tmp_path):
    data = tmp_path / "mine"
    data.mkdir()
    (data / "hello.txt").write_text("hello world")
    project = make_project(tmp_path / "p", [tiny_preset(books=data)])
    proc = run_main(project)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "there is nothing to train on" in out and "min_text_length = 32" in out and "Traceback" not in out
    assert "[model]" not in out  # said before the model is built


def test_ctrl_c_while_the_tokenizer_learns_stops_at_once(tmp_path):
    project = make_project(tmp_path, [tiny_preset(tokenizer={"vocab_size": 16384, "train_chars": 20_000_000},
                                                  data={"sources": [{"type": "text", "path": str(CORPUS),
                                                                     "name": "corpus"}]})])
    proc = start_main(project)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[data] 1 source(s)" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130 and "interrupted." in out and "Traceback" not in out, out
    assert "[tokenizer]" not in out  # it did not wait for the tokenizer to finish


def test_disk_full_during_the_stop_save_says_so_and_keeps_the_previous_save(interrupted_project):
    """Every write of the run's save fails (the fallback folders' too: nothing can be
    written anywhere): the stop says exactly what is lost, and the previous save is kept."""
    from tests.writefaults import SHORT_RETRY

    project = interrupted_project
    before = (project / "checkpoints" / RUN_STATE).read_bytes()
    saved = load_checkpoint(project / "checkpoints" / RUN_STATE)["counters"]["tokens"]
    # every later write of the run's save fails the way torch reports a full disk
    (project / "sitecustomize.py").write_text(
        SHORT_RETRY + "\nimport torch\n_real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(obj, dict) and obj.get('kind') == 'run_state':\n"
        "        raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0')\n"
        "    return _real(obj, f, *a, **k)\n"
        "torch.save = save\n")
    proc = start_main(project, budget=60_000, pythonpath=project)
    for line in proc.stdout:
        if "[resume] continuing at" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    out = " ".join(out.split())  # the terminal's wrapping undone
    assert proc.returncode == 2, out
    assert "could not write" in out and "is the disk full?" in out and "Traceback" not in out, out
    assert "error: nothing could be saved:" in out and "since the last save;" in out, out
    assert f"(at {saved:,} tokens) is kept, and a start resumes from it" in out, out
    assert (project / "checkpoints" / RUN_STATE).read_bytes() == before
    torch.load(project / "checkpoints" / RUN_STATE, weights_only=True)
