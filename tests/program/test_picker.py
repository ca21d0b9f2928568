"""The picker: Enter takes 00_best_general on a terminal, the default is taken (and said)
without one, and Ctrl-C exits quietly."""
import os
import pty
import re
import select
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.sample_presets import tiny_preset
from tests.userpath import make_project

PICK = ("import sys; sys.path.insert(0, {root!r}); from pathlib import Path; from program.picker import choose_preset; "
        "from rich.console import Console; p = choose_preset(Path({root!r}) / 'configs', Console(width=200)); "
        "print('PICKED', p.stem if p else None)")


def run_in_pty(code: str, keys: bytes, wait_for: bytes, limit: float = 300.0) -> tuple[int, str]:
    """Run python code on a pseudo-terminal; type `keys` once `wait_for` appears."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "TERM": "xterm", "COLUMNS": "200", "LINES": "50", "HF_HUB_OFFLINE": "1"})
    os.close(slave)
    out, sent, deadline = b"", False, time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not sent and wait_for in out:
            time.sleep(0.3)
            os.write(master, keys)
            sent = True
        if proc.poll() is not None and not ready:
            break
    proc.kill() if proc.poll() is None else None
    os.close(master)
    return proc.wait(), out.decode(errors="replace")


def pick_in(tmp_path, presets) -> str:
    project = make_project(tmp_path, presets)
    return PICK.format(root=str(ROOT)).replace(f"Path({str(ROOT)!r}) / 'configs'", f"Path({str(project)!r}) / 'configs'")


def test_enter_takes_the_default_on_a_terminal(tmp_path):
    code = pick_in(tmp_path, [tiny_preset("00_best_general"), tiny_preset("01_other"), tiny_preset("02_more")])
    code, out = run_in_pty(code, b"\r", b"Preset to train")
    assert code == 0, out
    assert "PICKED 00_best_general" in out


def test_arrow_then_enter_picks_another(tmp_path):
    code = pick_in(tmp_path, [tiny_preset("00_best_general"), tiny_preset("01_other"), tiny_preset("02_more")])
    code, out = run_in_pty(code, b"\x1b[B\r", b"Preset to train")
    assert "PICKED 01_other" in out, out


def test_enter_does_not_lead_an_offline_user_into_a_hub_preset(tmp_path):
    hub = tiny_preset("00_best_general", data={"sources": ["wikipedia"]})
    code = pick_in(tmp_path, [hub, tiny_preset("01_hub", data={"sources": ["fineweb_edu"]}), tiny_preset("02_local")])
    code, out = run_in_pty(code, b"\r", b"Preset to train")
    assert "needs the Hugging Face hub, which is unreachable from here" in out, out
    plain = " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).split())
    assert "00_best_general cannot run here (see the table): Enter takes 02_local instead" in plain, plain
    assert "PICKED 02_local" in out


def test_no_terminal_takes_the_default_and_says_so():
    proc = subprocess.run([sys.executable, "-c", PICK.format(root=str(ROOT))], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert "no terminal on stdin: taking the default preset 00_best_general" in proc.stdout
    assert "PICKED 00_best_general" in proc.stdout
    assert "params" in proc.stdout and "est. time" in proc.stdout  # the table was shown


def test_ctrl_c_at_the_picker_exits_quietly(tmp_path):
    code_ = ("import sys; sys.path.insert(0, {root!r}); import program; sys.exit(program.run({root!r}))"
             .format(root=str(ROOT)))
    code, out = run_in_pty(code_, b"\x03", b"Preset to train")
    assert code == 130, out
    assert "Traceback" not in out
