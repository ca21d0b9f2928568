"""Fault injection: does a run survive crashes, signals, full disks, NaNs, out-of-memory
and dying ranks without losing more than the work since its last save? Each fault_*
function runs its trials and returns one row ({"fault", "trials", "survived",
"data_lost_tokens", ...}); tests/train/test_faults.py runs them at a small count,
bench/faults.py at a large one. Every run trains tests/sample_presets.py's tiny preset.

What "survived" means for each fault:
  kill9        SIGKILL of `python main.py` at a random moment (often mid-step, sometimes mid-save or
               mid-rotation), restarted through main.py with no preset handed in:
               every checkpoint file left loads, lm_current/prev/prev2 are in order, the run
               resumes from its last completed save, and finishes with exactly its budget.
               data_lost_tokens: tokens trained after the last save, redone after the restart.
  rotation     SIGKILL right after each step of the end-of-run rotation (the new checkpoint
               written, then each rename): the next start completes the rotation in order.
  sigterm      SIGTERM mid-run: the run saves and exits within the bound, and resumes.
  enospc       the disk fills during an in-run save: the previous save and rolling files are
               intact, no partial file remains, the save is retried (and succeeds once there
               is room again) and training goes on.
  nan          non-finite loss at chosen steps: those steps are skipped and counted; a streak
               rolls the run back to its last save with half the learning rate; nothing
               non-finite is ever saved.
  oom          out-of-memory in the forward: the micro-batch halves, accumulation doubles,
               and the result equals the run without the fault (same effective batch).
  ddp_rank     one of two torchrun ranks dies: the other stops with an error, not a hang.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

import train.checkpoint_files as ck
from tests.sample_presets import ROOT, tiny_preset
from tests.userpath import main_command, make_project, run_main
from train import preset_from_dict
from train.checkpoint_files import CURRENT, PREV, PREV2, RUN_STATE, CheckpointError, load_checkpoint, recover_rotation
from train.checkpointer import load_run_state
from train.loop import Trainer
from train.progress import Reporter

# A child process that trains (resuming when there is something to resume). With
# KILL_AFTER_RENAMES=n it SIGKILLs itself right after the n-th rename of the rotation
# (n=0: right after the new checkpoint is fully written, before any rename).
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    import train.checkpoint_files as ck
    from train import preset_from_dict, train
    kill_after = int(os.environ.get("KILL_AFTER_RENAMES", "-1"))
    if kill_after >= 0:
        real_save, real_replace, renames = ck.atomic_save, os.replace, [0]
        def save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            if str(path).endswith(ck.NEXT) and kill_after == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        def replace(src, dst):
            real_replace(src, dst)
            if str(src).endswith((ck.PREV, ck.CURRENT, ck.NEXT)):
                renames[0] += 1
                if renames[0] == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        ck.atomic_save, ck.os.replace = save, replace
    preset, _ = preset_from_dict(json.loads({preset!r}), "faults")
    out = {out!r}
    result = train(preset, budget={budget}, out_dir=out, resume=os.path.exists(os.path.join(out, ck.RUN_STATE)))
    sys.exit(0 if result.finished else 130)
""")


def child_script(workdir: Path, preset: dict, budget: int) -> Path:
    path = workdir / "child.py"
    path.write_text(CHILD.format(root=str(ROOT), preset=json.dumps(preset), out=str(workdir / "ck"), budget=budget))
    return path


def check_files(folder: Path) -> list[str]:
    """Problems with the checkpoint folder: unloadable files, rolling files out of order."""
    problems, stamps = [], {}
    for path in sorted(folder.glob("*.pth")):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if path.name in (CURRENT, PREV, PREV2):
            stamps[path.name] = ckpt["finished_at"]
    order = [stamps[n] for n in (CURRENT, PREV, PREV2) if n in stamps]
    if order != sorted(order, reverse=True):
        problems.append(f"rolling checkpoints out of order: {stamps}")
    return problems


def trained_tokens(folder: Path) -> int:
    """The most tokens the metrics log says were trained (the progress a kill interrupts)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    run = rows[-1].get("run") if rows else None  # rows of the run in progress (a finished one may precede it)
    return max((r["tokens"] for r in rows if r.get("kind") == "train" and r.get("run") == run), default=0)


def saved_tokens(folder: Path) -> int:
    path = folder / RUN_STATE
    return load_run_state(path)["counters"]["tokens"] if path.exists() else 0


def fault_kill9(kills: int, seed: int = 0, budget: int = 12_288) -> dict:
    """SIGKILL `python main.py` at random moments and start it again each time, exactly as
    a user would (no terminal, so every restart takes the default answer: resume), until
    the run finishes. Only the token budget is smaller (tests/userpath.py)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp), [tiny_preset("00_faults")])
        folder = project / "checkpoints"
        survived, lost, problems, finished_runs = 0, 0, [], 0
        for trial in range(kills):
            proc = subprocess.Popen(main_command(project, budget), cwd=project, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
            time.sleep(rng.uniform(3.0, 9.0))  # start-up takes a few seconds; kills land at varied points
            if proc.poll() is not None:  # the run finished (or failed) before the kill
                err = proc.stderr.read().decode(errors="replace")
                finished_runs += proc.returncode == 0
                if proc.returncode == 0:
                    survived += 1
                else:
                    problems.append(f"trial {trial}: rc {proc.returncode}: {err[-300:]}")
                continue
            before = trained_tokens(folder)
            proc.kill()
            proc.wait()
            found = check_files(folder) if folder.exists() else []
            after = saved_tokens(folder)
            lost += max(0, before - after)
            if found:
                problems += found
            else:
                survived += 1
        # after the last kill, `python main.py` must still complete the run with exactly its budget
        final = run_main(project, budget, timeout=900)
        ok_end = final.returncode == 0 and load_checkpoint(folder / CURRENT)["tokens"] == budget
        if not ok_end:
            problems.append(f"final run failed (rc {final.returncode}): {(final.stdout + final.stderr)[-500:]}")
        return {"fault": "kill9", "trials": kills, "survived": survived if ok_end else 0, "via": "python main.py",
                "data_lost_tokens": lost, "finished_runs": finished_runs, "problems": problems[:5]}


def fault_rotation() -> dict:
    """SIGKILL after the new checkpoint is written and after each rename of the rotation."""
    survived, problems = 0, []
    for point in range(4):  # 0: after lm_next.pth written; 1..3: after each rename
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            script = child_script(work, tiny_preset("faults"), 512)
            folder = work / "ck"
            for _ in range(3):  # three finished runs: current, prev, prev2 all exist
                subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=600)
            stamps = [load_checkpoint(folder / n)["finished_at"] for n in (CURRENT, PREV)]
            env = {**os.environ, "KILL_AFTER_RENAMES": str(point)}
            proc = subprocess.run([sys.executable, str(script)], capture_output=True, env=env, timeout=600)
            killed = proc.returncode == -signal.SIGKILL
            recover_rotation(folder)  # what the next start does first
            found = check_files(folder)
            order_ok = (load_checkpoint(folder / PREV)["finished_at"] == stamps[0]
                        and load_checkpoint(folder / PREV2)["finished_at"] == stamps[1])
            if killed and not found and order_ok:
                survived += 1
            else:
                problems.append(f"point {point}: killed={killed} problems={found} order_ok={order_ok}")
    return {"fault": "rotation", "trials": 4, "survived": survived, "data_lost_tokens": 0, "problems": problems}


def fault_sigterm(bound_s: float = 60.0) -> dict:
    """SIGTERM mid-run: saved and exited within bound_s, then resumes to the end."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        budget = 8_192
        script = child_script(work, tiny_preset("faults", train={"checkpoint_every_tokens": 10**9}), budget)
        folder = work / "ck"
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while trained_tokens(folder) == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        reached = trained_tokens(folder)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return {"fault": "sigterm", "trials": 1, "survived": 0, "data_lost_tokens": None,
                    "problems": [f"did not exit within {bound_s}s"]}
        exit_s = time.monotonic() - t0
        saved = saved_tokens(folder)
        resumed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
        ok = (code == 130 and saved >= reached and resumed.returncode == 0
              and load_checkpoint(folder / CURRENT)["tokens"] == budget)
        return {"fault": "sigterm", "trials": 1, "survived": int(ok), "data_lost_tokens": max(0, reached - saved),
                "exit_s": round(exit_s, 2), "problems": [] if ok else [f"code={code} saved={saved} reached={reached}"]}


def _train_in_process(preset_dict: dict, budget: int, out: Path, setup=None, reporter=None):
    """Train in this process; `setup(trainer)` may install fault hooks after set-up."""
    preset, _ = preset_from_dict(preset_dict, "faults")
    trainer = Trainer(preset, budget, out, resume=False, reporter=reporter)
    trainer.setup()
    if setup:
        setup(trainer)
    return trainer, trainer.run()


def fault_enospc() -> dict:
    """The disk fills during the second in-run save."""
    class Quiet(Reporter):
        def __init__(self):
            super().__init__(enabled=False)
            self.warnings = []

        def warn(self, message):
            self.warnings.append(message)

    real = ck.torch.save
    calls = [0]

    def full_disk(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        if calls[0] == 3:  # the retry, right after the failed write: what is on disk then
            first["after"] = saved_tokens(out)
            first["files"] = sorted(p.name for p in out.iterdir() if p.name != Path(f.name).name)  # not the retry's own
        return real(obj, f, *a, **k)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rep = Quiet()
        first = {}

        def hook(trainer):
            orig = trainer.save_run_state

            def save():
                ok = orig()
                if ok and not first:
                    first.update(tokens=saved_tokens(out))
                return ok
            trainer.save_run_state = save

        ck.torch.save = full_disk
        try:
            _, result = _train_in_process(tiny_preset("faults"), 4096, out, hook, rep)
        finally:
            ck.torch.save = real
        ok = (result.finished and first.get("after") == first.get("tokens")
              and not any(".tmp" in f for f in first.get("files", []))
              and any("No space left on device" in w for w in rep.warnings))
        return {"fault": "enospc", "trials": 1, "survived": int(ok), "data_lost_tokens": 0,
                "problems": [] if ok else [str(first), rep.warnings[:3]]}


def poison_logits(trainer, bad_calls: set[int]):
    """A forward hook that makes the logits NaN on the given (1-based) training forward calls
    (one call per step attempt here: no accumulation, no splitting)."""
    calls = [0]

    def hook(module, args, output):
        if not module.training:
            return output
        calls[0] += 1
        if calls[0] in bad_calls:
            return output._replace(logits=output.logits * float("nan"))
        return output
    trainer.model.register_forward_hook(hook)


def fault_nan() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # attempts 3 and 9: isolated, skipped; 12-14: a streak after the save at step 8 -> roll back
        holder = {}

        def setup(t):
            holder["t"] = t
            poison_logits(t, {3, 9, 12, 13, 14})
            real_roll_back = t._roll_back

            def roll_back():  # the roll-back must restore the saved token count and weights exactly
                saved = load_run_state(out / RUN_STATE) if (out / RUN_STATE).exists() else None
                real_roll_back()
                if saved is not None:
                    holder["rolled_back_exactly"] = t.counters.tokens == saved["counters"]["tokens"] and all(
                        torch.equal(v, saved["model"][k]) for k, v in t.weights.state_dict().items())
            t._roll_back = roll_back

        trainer, result = _train_in_process(tiny_preset("faults"), 4096, out, setup, Reporter(enabled=False))
        finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
        exact = holder.get("rolled_back_exactly", False)
        faults = trainer.faults
        ok = (result.finished and finite and faults.skipped_steps >= 5 and faults.lr_scale == 0.5
              and result.tokens == 4096 and exact)
        return {"fault": "nan", "trials": 5, "survived": 5 if ok else 0, "data_lost_tokens": 0,
                "skipped_steps": faults.skipped_steps, "lr_scale": faults.lr_scale, "rolled_back_exactly": exact,
                "problems": [] if ok else [f"finished={result.finished} finite={finite}"]}


def fault_oom(arch: str = "transformer") -> dict:
    """Out of memory in every forward of more than one stream; for the hatchling the carried
    recurrent state is split into row groups and joined again, so the result must not change."""
    preset = tiny_preset("faults", arch=arch)
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = _train_in_process(preset, 2048, Path(tmp) / "a", None, Reporter(enabled=False))

        def setup(t):
            def hook(module, args, kwargs):
                if module.training and args[0].shape[0] > 1:  # only one training stream fits this "device"
                    raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            t.model.register_forward_pre_hook(hook, with_kwargs=True)

        trainer, result = _train_in_process(preset, 2048, Path(tmp) / "b", setup, Reporter(enabled=False))
        same = all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in
                   zip(base.model.state_dict().values(), trainer.model.state_dict().values()))
        splits = trainer.faults.splits
        ok = result.finished and splits == 4 and same
        return {"fault": "oom", "arch": arch, "trials": 1, "survived": int(ok), "data_lost_tokens": 0, "splits": splits,
                "same_result": same, "problems": [] if ok else [f"splits={splits} same={same}"]}


DDP_CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from train.loop import Trainer
    from train import preset_from_dict
    preset, _ = preset_from_dict(json.loads({preset!r}), "faults")
    t = Trainer(preset, 10**6, {out!r}, resume=False, reporter=None)
    t.setup()
    if t.ddp.rank == 1:
        real = t.train_step
        def dying():
            if t.counters.step == 5:
                os._exit(3)  # this rank dies mid-run
            return real()
        t.train_step = dying
    t.run()
""")


def fault_ddp_rank(limit_s: float = 240.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ddp_child.py"
        script.write_text(DDP_CHILD.format(root=str(ROOT), preset=json.dumps(tiny_preset("faults")), out=str(Path(tmp) / "ck")))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                   f"--master_port={port}", str(script)], capture_output=True, text=True,
                                  timeout=limit_s, env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            return {"fault": "ddp_rank", "trials": 1, "survived": 0, "data_lost_tokens": None,
                    "problems": [f"hung for {limit_s}s"]}
        seconds = time.monotonic() - t0
        said = "exitcode" in proc.stderr or "ChildFailedError" in proc.stderr or "failed" in proc.stderr.lower()
        ok = proc.returncode != 0 and said
        return {"fault": "ddp_rank", "trials": 1, "survived": int(ok), "data_lost_tokens": None,
                "stopped_after_s": round(seconds, 1), "problems": [] if ok else [proc.stderr[-500:]]}
