"""After training, driven through `python main.py` on a pseudo-terminal, for both archs,
on a model trained here (seconds) on a small text of facts ("alice sells apples. ..."):
talk to it (streaming, Ctrl-C stops a reply, Ctrl-D / an empty line return), evaluate it
(held-out figures and an lm-eval task built from its own training text, scored above
chance; a task whose data cannot be fetched and an unknown one each reported in one
line), export it (transformers loads the folder, the logits equal ours, generate() works),
and the TensorBoard files of the run (read back with tensorboard's event reader)."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest
import torch

from presets import preset_from_dict
from tests.conftest import ROOT
from train import train
from train.checkpoint_files import CURRENT, PREV

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
THINGS = ["apples", "boats", "candles", "drums", "eggs", "flutes", "grapes", "hats", "ink", "jars", "kites", "lamps"]
DOWN, ENTER = "\x1b[B", "\r"
BUDGET = 12_000  # enough for both archs to learn who sells what


def write_facts(folder: Path, n_docs: int, seed: int) -> None:
    """Documents of the same twelve facts, four times each, in orders of their own."""
    folder.mkdir(parents=True)
    rnd = random.Random(seed)
    for d in range(n_docs):
        lines = []
        for _ in range(4):  # long documents: a greedy reply goes on well past "alice sells apples."
            round_ = [f"{n} sells {t}." for n, t in zip(NAMES, THINGS)]
            rnd.shuffle(round_)
            lines += round_
        (folder / f"doc{d:03d}.txt").write_text(" ".join(lines) + "\n")


def write_tasks(folder: Path) -> None:
    """lm-eval tasks on local files: `own_facts` (who sells what, two choices: the right
    thing or another's; chance is 0.5), and `unfetchable` (its data is on a hub that is
    not reachable)."""
    folder.mkdir(parents=True)
    rnd = random.Random(1)
    rows = []
    for i, (name, thing) in enumerate(zip(NAMES, THINGS)):
        other = THINGS[(i + 1 + rnd.randrange(len(THINGS) - 1)) % len(THINGS)]
        choices = [f"{thing}.", f"{other}."] if i % 2 == 0 else [f"{other}.", f"{thing}."]
        rows.append({"context": f"{name} sells", "choices": choices, "label": i % 2})
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ('test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
              'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    (folder / "own_facts.yaml").write_text(
        f"task: own_facts\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'facts.jsonl'}\n"
        + common)
    (folder / "unfetchable.yaml").write_text("task: unfetchable\ndataset_path: no-such-org/no-such-dataset\n" + common)


def preset_dict(root: Path, arch: str) -> dict:
    model = {"arch": arch, "d_model": 64, "n_layers": 2, "n_heads": 2}
    if arch == "hatchling":
        model.update(global_every=2, wm_window=32, chunk_size=16)
    return {
        "name": "tiny", "description": "facts",
        "model": model,
        "train": {"seq_length": 32, "batch_size": 4, "lr": 3e-3, "warmup_tokens": 500, "log_every_steps": 5,
                  "eval_every_tokens": 6_000, "checkpoint_every_tokens": 1_000_000, "eval_tokens": 1024,
                  "samples": 1, "sample_tokens": 8},
        "data": {"sources": [{"type": "text", "path": str(root / "facts_a"), "name": "facts_a"},
                             {"type": "text", "path": str(root / "facts_b"), "name": "facts_b"}],
                 "eval_fraction": 0.2},
        "tokenizer": {"type": "bpe", "vocab_size": 300, "train_chars": 100_000},
        # greedy, and long enough that a reply is still streaming when Ctrl-C comes
        "generate": {"temperature": 0.0, "max_tokens": 5000, "no_repeat_ngram": 0},
        "eval": {"tasks": ["own_facts", "unfetchable", "no_such_task"], "include_path": str(root / "tasks"),
                 "batch_size": 8},
    }


@pytest.fixture(scope="module", params=["transformer", "hatchling"])
def project(request, tmp_path_factory):
    """A project folder of its own (main.py copied, the packages linked, one preset) with a
    finished model in checkpoints/ (lm_current.pth, and a copy as lm_prev.pth)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"after_{arch}")
    shutil.copy(ROOT / "main.py", root / "main.py")
    for name in ("model", "data", "presets", "train", "program"):
        (root / name).symlink_to(ROOT / name)
    write_facts(root / "facts_a", 30, seed=0)
    write_facts(root / "facts_b", 30, seed=1)
    write_tasks(root / "tasks")
    raw = preset_dict(root, arch)
    (root / "configs").mkdir()
    (root / "configs" / "00_tiny.json").write_text(json.dumps(raw, indent=2))
    preset, _ = preset_from_dict(raw, "tiny")
    result = train(preset, budget=BUDGET, out_dir=root / "checkpoints")
    assert result.finished
    shutil.copy(root / "checkpoints" / CURRENT, root / "checkpoints" / PREV)
    return Project(root, arch)


@dataclass
class Project:
    root: Path
    arch: str


def drive(root: Path, steps: list[tuple[str, str]], limit: float = 120.0) -> tuple[int, str]:
    """`python main.py` in `root` on a pseudo-terminal (its controlling terminal, so Ctrl-C
    is a real SIGINT): for each (text, keys), wait until `text` appears, then type `keys`.
    Returns (exit code, everything it printed)."""
    log = io.BytesIO()
    child = pexpect.spawn(sys.executable, ["main.py"], cwd=str(root), dimensions=(50, 160), timeout=limit,
                          env={**os.environ, "TERM": "xterm", "HF_HUB_OFFLINE": "1"})
    child.logfile_read = log
    try:
        for n, (text, keys) in enumerate(steps):
            try:
                child.expect_exact(text)
            except (pexpect.TIMEOUT, pexpect.EOF):
                raise AssertionError(f"stuck waiting for {text!r} (step {n}):\n"
                                     f"{log.getvalue().decode(errors='replace')[-6000:]}") from None
            time.sleep(0.3)  # let the prompt finish drawing
            child.send(keys)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True) if child.isalive() else child.close()
    code = child.exitstatus if child.exitstatus is not None else 128 + (child.signalstatus or 0)
    return code, log.getvalue().decode(errors="replace")


MENU = "What now?"
QUIT = (MENU, DOWN * 4 + ENTER)


def test_talk_streams_a_known_answer_ctrl_c_stops_it_and_ctrl_d_or_empty_line_returns(project):
    code, out = drive(project.root, [
        (MENU, DOWN + ENTER), ("Which model?", ENTER),
        ("you> ", "alice sells\r"), ("alice sells apples.", "\x03"),  # the answer streams; Ctrl-C stops the rest
        ("[stopped]", ""), ("you> ", "\x04"),  # Ctrl-D at the prompt: back to the question
        (MENU, DOWN + ENTER), ("Which model?", ENTER), ("you> ", ENTER),  # an empty line: back too
        QUIT])
    assert code == 0, out
    assert "Traceback" not in out
    assert out.count("Talking to lm_current.pth") == 2


def test_evaluate_writes_results_and_skips_what_cannot_run(project):
    code, out = drive(project.root, [(MENU, DOWN * 2 + ENTER), ("Which model?", DOWN + ENTER),  # lm_prev.pth
                                ("results written to", ""), QUIT], limit=240)
    assert code == 0, out
    assert "Traceback" not in out
    results = json.loads((project.root / "checkpoints" / "lm_prev.eval.json").read_text())
    held = results["heldout"]
    assert 0 < held["eval_loss"] < 2.0 and held["eval_ppl"] > 1 and 0 < held["eval_bpb"] < 2.0, held
    # the long-range row: facts re-stated further back than the model's attention reaches
    reach = 32 + (32 if project.arch == "hatchling" else 0)  # seq_length (+ wm_window)
    assert held["beyond_window_reach"] == reach and held["beyond_window_tokens"] > 0, held
    assert 0 < held["beyond_window_loss"] < 2.0, held
    assert "re-mentions beyond" in out
    assert results["tasks"]["own_facts"]["metrics"]["acc"] >= 0.9, results["tasks"]  # chance: 0.5
    for task in ("unfetchable", "no_such_task"):
        assert "error" in results["tasks"][task]
        assert f"{task}: skipped:" in out  # one line each, and the rest still ran
    assert "own_facts" in out and "bits per byte" in out  # the table


def test_export_loads_in_transformers_with_equal_logits_and_generates(project):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import generate
    from program.first_question import load_finished

    code, out = drive(project.root, [(MENU, DOWN * 3 + ENTER), ("Which model?", ENTER), ("exported to", ""), QUIT])
    assert code == 0, out
    folder = project.root / "exports" / "tiny-lm_current"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "modeling_hatchling.py", "configuration_hatchling.py"):
        assert (folder / name).is_file(), name
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
    assert set(modes.values()) == {modes["config.json"]}, modes  # the weights too (safetensors writes 0600)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    ours = load_finished(project.root / "checkpoints" / CURRENT, device=torch.device("cpu"))
    assert hf.lm.lm_head.weight.data_ptr() == hf.lm.embed.weight.data_ptr()  # tied after the safetensors trip
    text = "bob sells boats. carol sells candles. dave sells"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.tokenizer.encode(text)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours.model(ids).logits, atol=1e-5)
        ids = tok("alice sells", return_tensors="pt").input_ids
        new = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    mine = generate(ours.model, ids[0].tolist(), max_new_tokens=8, temperature=0.0, no_repeat_ngram=0,
                    stop_token=ours.tokenizer.eot_id)
    assert new[:len(mine)] == mine  # transformers' greedy decoding is ours
    assert tok.decode(new).startswith(" apples."), tok.decode(new)


def test_tensorboard_files_have_the_curves(project):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((project.root / "checkpoints" / "tensorboard").iterdir())
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "eval/loss", "eval/ppl",
                "source_loss/facts_a", "source_loss/facts_b"}
    if project.arch == "hatchling":
        expected.add("metric/spike_rate/layer0")
    assert expected <= tags, tags
    losses = acc.Scalars("train/loss")
    assert losses[-1].step == BUDGET and losses[-1].value < losses[0].value
    assert len(acc.Scalars("eval/loss")) == 2  # at 6k tokens and at the end


def test_ctrl_c_at_the_first_question_exits_quietly(project):
    code, out = drive(project.root, [(MENU, "\x03")])
    assert code == 130, out
    assert "Traceback" not in out


def test_no_terminal_takes_the_default_in_one_line(project, capsys):
    from rich.console import Console

    from program.first_question import first_question

    assert first_question(project.root, Console(width=200)) is None  # pytest's stdin is no terminal
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no terminal on stdin: training (the default" in out
