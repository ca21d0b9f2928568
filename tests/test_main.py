"""`python main.py` with no terminal on an offline machine: the default preset (Hugging
Face streams) fails within seconds, lists every source with its reason, gives a hint, and
stops before touching any checkpoint. No traceback."""
import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_default_preset_offline_fails_fast_and_clearly(tmp_path):
    shutil.copy(ROOT / "main.py", tmp_path / "main.py")  # main.py works from its own folder
    for name in ("configs", "model", "data", "presets", "train", "program"):
        (tmp_path / name).symlink_to(ROOT / name)
    # the hub address is a closed local port: refused at once, the same path as a machine with no network
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "taking the default preset 00_best_general" in out
    assert "no data source could be opened" in out
    for source in ("fineweb_edu", "wikipedia"):
        assert f"  - {source}: " in out and "unreachable" in out
    assert "hint: offline?" in out
    assert "stopped before touching any checkpoint" in out
    assert "Traceback" not in out
    # checkpoints/ is made and locked before the picker (train.lock); no checkpoint is written
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["train.lock"]
