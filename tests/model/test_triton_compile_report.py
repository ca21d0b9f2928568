"""bench/kernel_report.py on one small kernel and one arch: the kernel compiles for sm_90 on
this CPU (triton.compile with a GPUTarget, ptxas' report) and the report says registers,
spills and shared memory, and that it fits. In a child process without TRITON_INTERPRET
(this process has it set, tests/model/conftest.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_report_compiles_the_norm_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # nothing written under the user's home
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--arch", "90", "--only",
                          "norm_fwd_kernel", "--no-fla"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kernels = [r for r in rows if r.get("kernel") == "norm_fwd_kernel"]
    assert len(kernels) == 2  # float32 and bfloat16 inputs
    for r in kernels:
        assert r["arch"] == "sm_90" and r["fits"] and 0 < r["registers"] <= 255
        assert 0 <= r["shared"] <= r["shared_limit"] and r["spills"] == 0 and r["threads"] == 128
    assert rows[-1] == {"summary": "kernel_report", "launches": 12, "failed": []}
