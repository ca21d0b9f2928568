"""Beyond one process, the way users launch it: torchrun on CPU (gloo).

- a run of 2 processes resumes on 1 and a run of 1 on 2, through `python main.py` /
  `torchrun main.py`, keeping the token count and the budget exactly, saying what changed;
- two "nodes" (two torchrun launchers, each in its own copy of the project folder, no
  shared disk) train, stop on Ctrl-C to both launchers, restart, and end with the loss
  curve of the same run left alone; no traceback from any rank or launcher, and only
  node 0's folder holds the run, which also resumes on node 0 alone.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.sample_presets import tiny_preset
from tests.userpath import make_project, run_main, torchrun_main
from train.checkpoint_files import CURRENT, RUN_STATE, load_checkpoint

pytestmark = pytest.mark.usefixtures("corpus")

BUDGET = 6144
PRESET = tiny_preset(train={"checkpoint_every_tokens": 1024, "log_every_steps": 1})

# the interrupted 2-process run: stopped exactly at 2048 tokens (a SIGINT each rank sends itself)
STOP_AT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from tests.conftest import InterruptAt
    from train import preset_from_dict, train
    preset, _ = preset_from_dict(json.loads({preset!r}), "tiny")
    result = train(preset, {budget}, {out!r}, reporter=InterruptAt({at}))
    assert not result.finished
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc: subprocess.Popen, limit: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=limit)
    return proc.returncode, flat(out)


def flat(text: str) -> str:
    """The output with rich's line wrapping undone (every run of whitespace one space)."""
    return " ".join(text.split())


def train_rows(folder: Path) -> dict[int, float]:
    """{tokens: loss} of the metrics' train rows."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["tokens"]: r["loss"] for r in rows if r.get("kind") == "train"}


def test_two_processes_resume_on_one_and_one_resumes_on_two(tmp_path):
    project = make_project(tmp_path / "p", [PRESET])
    script = tmp_path / "stop_at.py"
    script.write_text(STOP_AT.format(root=str(ROOT), preset=json.dumps(PRESET), budget=BUDGET, at=2048,
                                     out=str(project / "checkpoints")))
    stop = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(script)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert load_checkpoint(project / "checkpoints" / RUN_STATE)["world_size"] == 2, stop.stdout + stop.stderr

    proc = run_main(project, budget=BUDGET)  # the user restarts on one process
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert ("the run used 2 process(es), this start has 1: global batch kept (grad_accum_steps 1 -> 2); data "
            "re-sharded over 1 reader(s), 0 document(s) will be read twice") in out, out
    assert load_checkpoint(project / "checkpoints" / CURRENT)["tokens"] == BUDGET

    # and back: a one-process run stopped (in this process, at 2048 tokens), resumed by torchrun on two
    other = make_project(tmp_path / "q", [PRESET])
    script.write_text(STOP_AT.format(root=str(ROOT), preset=json.dumps(PRESET), budget=BUDGET, at=2048,
                                     out=str(other / "checkpoints")))
    subprocess.run([sys.executable, str(script)], capture_output=True, timeout=240)
    assert load_checkpoint(other / "checkpoints" / RUN_STATE)["world_size"] == 1
    code, out = finish(torchrun_main(other, BUDGET, free_port(), nproc=2))
    assert code == 0 and "Traceback" not in out, out
    assert "the run used 1 process(es), this start has 2: global batch 128 -> 256 tokens a step" in out, out
    assert "0 document(s) will be read twice" in out
    assert load_checkpoint(other / "checkpoints" / CURRENT)["tokens"] == BUDGET
    resized = [json.loads(line) for line in (other / "checkpoints" / "metrics.jsonl").read_text().splitlines()
               if '"resized"' in line]
    assert resized and resized[0]["repeated_documents"] == 0


def two_nodes(base: Path, port: int) -> list[subprocess.Popen]:
    return [torchrun_main(base / f"node{n}", BUDGET, port, nnodes=2, node_rank=n) for n in (0, 1)]


def test_two_nodes_stop_on_ctrl_c_and_resume_as_if_never_stopped(tmp_path):
    for run in ("ref", "cut"):
        for n in (0, 1):
            make_project(tmp_path / run / f"node{n}", [PRESET])
    ref = two_nodes(tmp_path / "ref", free_port())
    for proc in ref:
        code, out = finish(proc)
        assert code == 0 and "Traceback" not in out, out
    assert not (tmp_path / "ref" / "node1" / "checkpoints").exists()  # only global rank 0's node writes

    cut = two_nodes(tmp_path / "cut", free_port())
    metrics = tmp_path / "cut" / "node0" / "checkpoints" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(train_rows(metrics.parent)) < 12):
        time.sleep(0.2)
    for proc in cut:  # Ctrl-C in each node's terminal (or a scheduler's SIGTERM to each): its launcher's group
        os.killpg(proc.pid, signal.SIGINT)
    outs = [finish(proc) for proc in cut]
    for code, out in outs:  # each launcher ended once the save was done (the shell says "Killed", 137)
        assert code == -signal.SIGKILL and "Traceback" not in out, out
    assert "[stop] saved the run at" in outs[0][1], outs[0][1]
    stopped_at = load_checkpoint(tmp_path / "cut" / "node0" / "checkpoints" / RUN_STATE)["counters"]["tokens"]
    assert 0 < stopped_at < BUDGET
    assert not (tmp_path / "cut" / "node1" / "checkpoints").exists()

    # one node left: node 0's folder alone resumes on one process (a copy, so the two-node restart below has its own)
    alone_dir = tmp_path / "one_node"
    shutil.copytree(tmp_path / "cut" / "node0", alone_dir, symlinks=True)
    proc = run_main(alone_dir, budget=BUDGET)
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and "the run used 2 process(es), this start has 1" in out, out
    assert load_checkpoint(alone_dir / "checkpoints" / CURRENT)["tokens"] == BUDGET

    again = two_nodes(tmp_path / "cut", free_port())
    for proc in again:
        code, out = finish(proc)
        assert code == 0 and "Traceback" not in out, out
    resumed, alone = train_rows(tmp_path / "cut" / "node0" / "checkpoints"), train_rows(
        tmp_path / "ref" / "node0" / "checkpoints")
    after = [t for t in resumed if t > stopped_at]
    assert after and max(after) == BUDGET
    assert all(abs(resumed[t] - alone[t]) < 1e-4 for t in after), [(t, resumed[t], alone[t]) for t in after]
