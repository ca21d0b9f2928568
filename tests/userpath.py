"""Driving the program the way a user does: `python main.py` in a project folder of its
own (copied main.py, the packages linked, presets of the test's choosing), on a
pseudo-terminal or with no terminal at all.

The one change from a user's machine is the token budget: a child process sets
`program.TOKEN_BUDGET` before running main.py, so a run finishes in seconds. Nothing else
is handed in: the preset comes from the picker, resumption from the resume question.
The fault trials (tests/faults.py) use the same helpers for their kill -9s; the tiny
preset they all train is tests/sample_presets.py's."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.sample_presets import ROOT

# main.py run as a user runs it, under a smaller token budget
MAIN = ("import runpy, sys; sys.path.insert(0, {root!r}); import program; program.TOKEN_BUDGET = {budget}; "
        "sys.argv = ['main.py']; runpy.run_path({main!r}, run_name='__main__')")


def make_project(folder: Path, presets: list[dict] | dict[str, object]) -> Path:
    """A project folder: main.py, the packages (linked), and configs/ holding `presets`
    (dicts written as <name>.json, or {file stem: dict or raw text})."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "main.py", folder / "main.py")
    for name in ("model", "data", "presets", "train", "program"):
        if not (folder / name).exists():
            (folder / name).symlink_to(ROOT / name)
    configs = folder / "configs"
    configs.mkdir(exist_ok=True)
    items = presets.items() if isinstance(presets, dict) else ((p["name"], p) for p in presets)
    for stem, body in items:
        (configs / f"{stem}.json").write_text(body if isinstance(body, str) else json.dumps(body, indent=1))
    return folder


def main_command(project: Path, budget: int) -> list[str]:
    return [sys.executable, "-c", MAIN.format(root=str(ROOT), budget=budget, main=str(project / "main.py"))]


def env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm", "COLUMNS": "160", "LINES": "50", **extra}


def run_main(project: Path, budget: int = 4096, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python main.py` with no terminal on stdin, to the end."""
    return subprocess.run(main_command(project, budget), cwd=project, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=env())


def start_main(project: Path, budget: int = 4096, pythonpath: Path | None = None) -> subprocess.Popen:
    """`python main.py` with no terminal on stdin, in the background (stderr joined to
    stdout); `pythonpath` puts a folder first on the import path (a sitecustomize.py
    there injects a fault)."""
    extra = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
    return subprocess.Popen(main_command(project, budget), cwd=project, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(**extra))


def spawn_main(project: Path, budget: int = 4096, timeout: float = 120):
    """`python main.py` on a pseudo-terminal (pexpect)."""
    import pexpect

    cmd = main_command(project, budget)
    child = pexpect.spawn(cmd[0], cmd[1:], cwd=str(project), env=env(), timeout=timeout, encoding="utf-8",
                          codec_errors="replace",
                          dimensions=(50, 160))
    child.logfile_read = io.StringIO()  # everything the program printed, for checks after EOF
    return child


def torchrun_main(project: Path, budget: int, port: int, nproc: int = 1, nnodes: int = 1, node_rank: int = 0,
                  extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`torchrun ... main.py` in `project` with no terminal, in a session of its own (so a
    test can signal the launcher's whole process group, as a terminal's Ctrl-C does);
    several "nodes" on this machine share 127.0.0.1:port (static rendezvous: node_rank 0
    holds global rank 0). stderr joined to stdout."""
    script = project / "main_with_budget.py"  # main.py under the test's budget: torchrun runs a file
    script.write_text(MAIN.format(root=str(ROOT), budget=budget, main=str(project / "main.py")).replace("; ", "\n"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
           "--master_addr=127.0.0.1", f"--master_port={port}", f"--nproc_per_node={nproc}", *extra, str(script)]
    return subprocess.Popen(cmd, cwd=project, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env(OMP_NUM_THREADS="1"))
