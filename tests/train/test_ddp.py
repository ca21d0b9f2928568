"""torchrun with two CPU processes (gloo): both ranks train, read different data, end
with identical weights, and only rank 0 writes files."""
import json
import socket
import subprocess
import sys
import textwrap

import torch

from tests.conftest import ROOT, tiny_preset_dict
from train.checkpoint_files import CURRENT, load_checkpoint

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from train.loop import Trainer
    from presets import preset_from_dict
    preset, _ = preset_from_dict(json.loads({preset!r}), "tiny")
    t = Trainer(preset, {budget}, {out!r}, resume=False, reporter=None)
    t.setup()
    first = t.streams.next_batch().tokens  # peek at this rank's data, then rewind
    t.setup()
    result = t.run()
    torch.save({{"model": t.model.state_dict(), "first": first, "tokens": result.tokens}},
               {out!r} + f"/rank{{t.ddp.rank}}.pt")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_agree_on_weights(corpus, tmp_path):
    out = tmp_path / "ck"
    preset = json.dumps(tiny_preset_dict(corpus / "books"))
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT.format(root=str(ROOT), preset=preset, budget=2048, out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["tokens"] == r1["tokens"] == 2048  # the budget is summed over ranks
    assert not torch.equal(r0["first"], r1["first"]), "both ranks read the same data"
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    assert all(torch.equal(r0["model"][k], v) for k, v in load_checkpoint(out / CURRENT)["model"].items())
    assert proc.stdout.count("[done]") == 1  # only rank 0 reports
