"""The training run: exactly `budget` tokens of AdamW on a preset's data, with periodic
evaluation, in-run saves and the end-of-run checkpoint rotation.

`train()` makes a Trainer. Its constructor checks what can be checked before anything
heavy starts (the stored run when resuming, the sources, the memory); `setup()` builds
the pieces (train/assemble.py) and registers each stateful one with the checkpointer
(train/checkpointer.py), which restores them all when resuming; `run()` is the loop:
one `train_step()`, then its bookkeeping (progress and metrics, adaptive source weights,
evaluation, the in-run save, a requested stop), and at the budget the final evaluation
and the checkpoint rotation."""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from data import open_sources
from model import build_model, count_params, map_state
from presets import TOKEN_BUDGET, Preset, preset_from_dict

from .assemble import (
    check_memory,
    check_training_documents,
    choose_tokenizer,
    continue_from,
    held_out,
    pick_device,
    seed_and_precision,
    tolerant_load,
    training_streams,
    wrap_for_training,
)
from .bad_steps import MAX_BAD_STEPS, Faults
from .checkpoint_files import RUN_STATE, CheckpointError, atomic_save, recover_rotation, rotate_checkpoints
from .checkpointer import Checkpointer, finished_checkpoint, load_run_state
from .distributed import all_reduce_sum, any_rank, barrier, init_distributed
from .errors import TrainError
from .heldout import evaluate, generate_samples
from .metrics import CurveLog
from .optim import build_optimizer, build_scheduler
from .progress import Reporter, Window, human, train_row
from .source_weights import AdaptiveSources
from .state import CarriedState, Counters, ModelWeights, RngState
from .step import TrainStep


@dataclass
class RunResult:
    tokens: int  # training tokens of this run so far (== budget when finished)
    steps: int
    finished: bool  # False when stopped early (Ctrl-C / SIGTERM); run_state.pth holds it
    eval: dict
    checkpoint: Optional[Path]
    stop_signal: Optional[int] = None  # the signal that stopped an unfinished run


class StopFlag:
    """Ctrl-C / SIGTERM ask the run to save and stop at the next step boundary; a second
    Ctrl-C stops at once (checkpoint writes are atomic, so nothing is corrupted)."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class SpeedReport:
    """Calls `on_speed(preset, tokens/s of one process)` once, measured from the first
    progress update (past the warm-up steps) until `after_s` seconds later."""

    def __init__(self, on_speed: Optional[Callable[[Preset, float], None]], after_s: float = 60.0):
        self.on_speed, self.after_s, self.start = on_speed, after_s, None

    def observe(self, preset: Preset, tokens: int, world_size: int) -> None:
        if self.on_speed is None:
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = (now, tokens)
        elif now - self.start[0] >= self.after_s:
            self.on_speed(preset, (tokens - self.start[1]) / (now - self.start[0]) / world_size)
            self.on_speed = None


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Trainer:
    """One run: the constructor's checks, `setup()`, then `run()` (train() does all three).

    Over ~150 lines because it is where the pieces meet, read top to bottom: the checks,
    the wiring of the pieces (built by train/assemble.py, each stateful one registered with
    the checkpointer), the step's counting, the loop and its bookkeeping. Every method is
    short; what a piece does lives in its own module (step.py, faults.py, adaptive.py,
    state.py, progress.py, checkpointer.py)."""

    def __init__(self, preset: Optional[Preset], budget: int, out_dir: Path, resume: bool,
                 reporter: Optional[Reporter], on_speed: Optional[Callable[[Preset, float], None]] = None):
        self.out, self.budget, self.stored = Path(out_dir), budget, None
        self.speed = SpeedReport(on_speed)
        if resume:  # the stored preset is the run's, whatever the caller passed (the picker passes None)
            self.stored = load_run_state(self.out / RUN_STATE)
            preset, _ = preset_from_dict(self.stored["preset"], f"{self.out / RUN_STATE} (stored preset)")
            self.budget = self.stored["budget"]
        elif preset is None:
            raise TrainError("no preset to train and no interrupted run to resume")
        self.d = init_distributed(preset.train.device)
        self.rep = reporter or Reporter(enabled=self.d.is_main)
        if not self.d.is_main:
            self.rep.enabled = False
        if resume and self.stored["world_size"] != self.d.world_size:
            raise TrainError(f"the interrupted run used {self.stored['world_size']} process(es), this start has "
                             f"{self.d.world_size}: resume it with the same number, or move "
                             f"{self.out / RUN_STATE} away to start a new run")
        self.preset, self.cfg = preset, preset.train
        self.device = pick_device(self.cfg.device, self.d)
        # data first: when no source opens, the run stops here, before any file is touched
        self.sources = open_sources(preset.data, log=self.rep.log if self.d.is_main else (lambda m: None))
        check_training_documents(self.sources, preset.data, self.d, self.device)
        check_memory(preset, self.device)
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if recover_rotation(self.out):
                self.rep.warn("finished an interrupted checkpoint rotation from the previous run")
        barrier(self.d)
        # a run's rows in metrics.jsonl carry its id; a resumed run keeps the id it started with
        self.run_id = (self.stored or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S")
        self.metrics = CurveLog(self.out / "metrics.jsonl", enabled=self.d.is_main, run=self.run_id,
                                log=self.rep.log)  # + TensorBoard files and a terminal loss curve
        self.metrics.write({"kind": "run_start", "preset": preset.name, "resumed": resume, "world_size": self.d.world_size,
                            "tokens": self.stored["counters"]["tokens"] if self.stored else 0, "budget": self.budget})

    def setup(self) -> None:
        """Build the run's pieces; when resuming, the checkpointer restores every stateful one."""
        cfg, d, rep, preset = self.cfg, self.d, self.rep, self.preset
        self.autocast = seed_and_precision(cfg, d.rank, self.device)
        rep.log(f"[data] {len(self.sources)} source(s): {', '.join(s.name for s in self.sources)}")
        start = None if self.stored else continue_from(self.out, asdict(preset.model), rep.warn)
        stored = self.stored or (start[1] if start else None)
        self.tokenizer = choose_tokenizer(preset, self.sources, stored and stored["tokenizer"], start and start[0], d, rep)
        self.model = build_model(preset.model, self.tokenizer.vocab_size, preset.auxiliary)
        if start is not None:
            loaded = tolerant_load(self.model, start[1]["model"], rep)
            rep.log(f"[model] continuing from {start[0]} ({loaded} tensors loaded)")
        self.model.to(self.device)
        self.n_params = count_params(self.model)
        rep.log(f"[model] {preset.model.arch}: {self.n_params / 1e6:.2f}M parameters, vocab {self.tokenizer.vocab_size}, "
                f"device {self.device}, world size {d.world_size}")
        self.train_model = wrap_for_training(self.model, cfg.compile, d, self.device)

        self.tokens_per_step = cfg.batch_size * cfg.seq_length * cfg.grad_accum_steps * d.world_size
        self.total_steps = math.ceil(self.budget / self.tokens_per_step)
        self.faults = Faults(cfg.batch_size, cfg.grad_accum_steps, d.enabled, rep.warn)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps, self.tokens_per_step,
                                         scale=lambda: self.faults.lr_scale)
        self.streams = training_streams(self.sources, preset, self.tokenizer, d, rep.log)
        self.counters = Counters(next_eval=cfg.eval_every_tokens, next_save=cfg.checkpoint_every_tokens)
        self.carried = CarriedState(self.device)
        if start is not None and start[1].get("memory") and getattr(self.model, "lifelong", False):
            # lifelong mode: a new run starts with the memory contents the last one ended with
            self.carried.value = self.model.state_from_memory(start[1]["memory"], cfg.batch_size, self.device)
            rep.log("[model] lifelong: starting with the stored procedural/episodic memory contents")
        self.one_step = TrainStep(self.model, self.train_model, self.optimizer, self.scheduler, self.faults,
                                  self.carried, self.autocast, cfg, d, self.device, self.tokenizer.eot_id,
                                  len(self.sources))
        aux = preset.auxiliary
        self.adaptive = None
        if aux.enable_adaptive_sources and len(self.sources) > 1:
            self.adaptive = AdaptiveSources(aux, len(self.sources), self.device)

        model_cfg = preset.model
        refusal = (f"{self.out / RUN_STATE} holds weights that do not fit its own stored model ({model_cfg.arch} "
                   f"d{model_cfg.d_model} L{model_cfg.n_layers}): it was written by another version or edited; "
                   "move it away to start a new run")
        self.weights = ModelWeights(self.model, refusal)
        shared = {"model": self.weights, "optimizer": self.optimizer, "scheduler": self.scheduler,
                  "counters": self.counters, "faults": self.faults}
        if self.adaptive is not None:
            shared["adaptive"] = self.adaptive
        identity = {"preset": preset.to_dict(), "model_config": asdict(model_cfg),
                    "tokenizer": {"json": self.tokenizer.to_json(), "spec": self.tokenizer.spec},
                    "budget": self.budget, "world_size": d.world_size, "run_id": self.run_id}
        self.checkpointer = Checkpointer(d, identity, shared, {"streams": self.streams, "carried": self.carried,
                                                               "rng": RngState(self.device)})
        if self.stored is not None:
            self.checkpointer.load_state_dict(self.stored)
            rep.log(f"[resume] continuing at {human(self.counters.tokens)}/{human(self.budget)} tokens, "
                    f"step {self.counters.step}")
        self.eval_batches, self.prompts = held_out(self.sources, preset, self.tokenizer, d, rep)

    # -- one training step ---------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over the streams' next batches (train/step.py), counted, or
        skipped and, when the faults say so, followed by a roll-back."""
        batches = [self.streams.next_batch() for _ in range(self.cfg.grad_accum_steps)]
        out = self.one_step(batches, self.budget - self.counters.tokens, self.counters.step + 1)
        if out["roll_back"]:
            self._roll_back()
        elif not out["skipped"]:
            self.counters.step += 1
            self.counters.tokens += out["n"]
        return out

    def _roll_back(self) -> None:
        """Back to the last in-run save (everything but the fault counters) with the
        learning rate halved; without a save yet, only the learning rate is halved."""
        self.faults.roll_back()
        path = self.out / RUN_STATE
        if path.exists():
            self.checkpointer.load_state_dict(load_run_state(path), keep=("faults",))
            self.rep.warn(f"{MAX_BAD_STEPS} bad steps in a row: rolled back to the save at "
                          f"{human(self.counters.tokens)} tokens, learning rate x{self.faults.lr_scale:g}")
        else:
            self.rep.warn(f"{MAX_BAD_STEPS} bad steps in a row before any save: learning rate "
                          f"x{self.faults.lr_scale:g}")

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg, d, rep, n = self.cfg, self.d, self.rep, self.counters
        rep.log(f"[train] {human(self.budget)} tokens in {self.total_steps} steps of {human(self.tokens_per_step)} tokens "
                f"({d.world_size} x {cfg.grad_accum_steps} x {cfg.batch_size} streams x {cfg.seq_length})")
        rep.start(self.budget, n.tokens)
        window = Window(len(self.sources), self.device, n.tokens)
        last_eval: dict = {}
        stopped = False
        self.model.train()
        try:
            with StopFlag() as stop:
                while n.tokens < self.budget:
                    out = self.train_step()
                    if not out["skipped"]:
                        window.add(out)
                        if self.adaptive is not None:
                            self.adaptive.add(out["src_loss"], out["src_count"])
                            if self.adaptive.due(n.tokens):
                                self._reweight()
                    if n.step % cfg.log_every_steps == 0 or n.tokens >= self.budget:
                        self._log(window, out)
                    if n.tokens >= n.next_eval and n.tokens < self.budget:
                        last_eval = self._evaluate(samples=True)
                        n.next_eval += cfg.eval_every_tokens
                    if n.tokens >= n.next_save and n.tokens < self.budget:
                        self.save_run_state()
                        n.next_save += cfg.checkpoint_every_tokens
                    if any_rank(stop.requested, d, self.device):
                        stopped = True
                        break
        finally:
            rep.close()
            close = getattr(self.streams.documents, "close", None)
            if close is not None:
                close()  # background data workers
        if stopped:
            if not self.save_run_state():
                rep.warn("the stop could not be saved; the run resumes from its previous save")
            rep.log(f"[stop] saved the run at {human(n.tokens)}/{human(self.budget)} tokens to "
                    f"{self.out / RUN_STATE}; start again and press Enter to resume")
            return RunResult(n.tokens, n.step, False, last_eval, self.out / RUN_STATE, stop.signum)
        last_eval = self._evaluate(samples=True)
        if d.is_main:
            if not all_finite(self.model.parameters()):
                raise TrainError("the final weights are not finite; they were not saved (the last in-run save is "
                                 f"kept in {self.out / RUN_STATE})")
            rotate_checkpoints(self.final_checkpoint(last_eval), self.out)
            (self.out / RUN_STATE).unlink(missing_ok=True)
            rep.log(f"[done] {human(n.tokens)} tokens; checkpoint {self.out / 'lm_current.pth'}"
                    + (f"; held-out loss {last_eval['eval_loss']:.3f} (ppl {last_eval['eval_ppl']:.1f})" if last_eval else ""))
        barrier(d)
        return RunResult(n.tokens, n.step, True, last_eval, self.out / "lm_current.pth")

    # -- the bookkeeping ----------------------------------------------------------------------
    def save_run_state(self) -> bool:
        """The in-run save (every rank takes part). Never writes non-finite weights; a failed
        write (disk full) is reported and training goes on, the previous save intact. True if saved."""
        state = self.checkpointer.state_dict()
        saved = False
        if self.d.is_main:
            if not all_finite(self.model.parameters()):
                self.rep.warn("weights are not finite: this save is skipped (the previous one is kept)")
            else:
                try:
                    atomic_save(state, self.out / RUN_STATE)
                    saved = True
                except CheckpointError as e:
                    self.rep.warn(f"in-run save failed: {e}; training goes on")
        barrier(self.d)
        return saved

    def final_checkpoint(self, eval_row: dict) -> dict:
        memory = None  # in lifelong mode the memory contents are part of what was learned
        if getattr(self.model, "lifelong", False) and self.carried.value is not None:
            memory = map_state(self.model.memory_state(self.carried.value), lambda t: t.cpu())
        return finished_checkpoint(self.weights.state_dict(), self.preset, self.tokenizer, self.counters.tokens, eval_row, memory)

    def _reweight(self) -> None:
        """New adaptive source weights for the document stream; a metrics row and a log line."""
        weights, losses = self.adaptive.update(self.d)
        self.streams.documents.set_weights(weights)
        named = {s.name: round(w, 3) for s, w in zip(self.sources, weights)}
        self.metrics.write({"kind": "source_weights", "step": self.counters.step, "tokens": self.counters.tokens,
                            "weights": named, "source_loss": {s.name: l for s, l in zip(self.sources, losses)}})
        self.rep.log(f"[data] source weights at {human(self.counters.tokens)} tokens: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in named.items()))

    def _log(self, window: Window, out: dict) -> None:
        """A progress update: the window's figures summed over ranks, to metrics.jsonl and the display."""
        packed = all_reduce_sum(window.packed(), self.d)
        n_src, tokens = len(self.sources), self.counters.tokens
        tokens_per_s = (tokens - window.tokens) / max(1e-9, time.perf_counter() - window.t)
        loss = packed[0].item() / max(1, tokens - window.tokens)
        lr = self.scheduler.get_last_lr()[0]
        src_l, src_c = packed[1:1 + n_src], packed[1 + n_src:]
        source_loss = {s.name: (src_l[i] / src_c[i]).item() if src_c[i] > 0 else None
                       for i, s in enumerate(self.sources)}
        row, detail = train_row({"step": self.counters.step, "tokens": tokens, "loss": loss, "lr": lr,
                                 "tokens_per_s": tokens_per_s, "grad_norm": float(out["grad_norm"]),
                                 "skipped_steps": self.faults.skipped_steps}, source_loss, out["aux"], out["metrics"])
        self.metrics.write(row)
        self.rep.update(tokens, loss, lr, tokens_per_s, detail)
        if self.d.is_main:
            self.speed.observe(self.preset, tokens, self.d.world_size)
        window.restart(tokens)

    def _evaluate(self, samples: bool) -> dict:
        row: dict = {}
        if self.d.is_main and self.eval_batches:
            row = evaluate(self.model, self.eval_batches, self.tokenizer.eot_id, self.device, self.autocast)
            self.metrics.write({"kind": "eval", "step": self.counters.step, "tokens": self.counters.tokens, **row})
            self.rep.log(f"[eval] {human(self.counters.tokens)} tokens: held-out loss {row['eval_loss']:.3f}, "
                         f"perplexity {row['eval_ppl']:.1f}")
            if samples and self.prompts:
                for prompt, text in generate_samples(self.model, self.tokenizer, self.prompts, self.cfg.sample_tokens,
                                                     seed=self.counters.step):
                    self.rep.log(f"  [sample] {prompt!r} -> {text!r}", style="dim")
        barrier(self.d)
        return row


def train(preset: Optional[Preset], budget: int = TOKEN_BUDGET, out_dir: str | Path = "checkpoints", resume: bool = False,
          reporter: Optional[Reporter] = None, on_speed: Optional[Callable[[Preset, float], None]] = None) -> RunResult:
    """Train `preset` for `budget` tokens (the product always uses TOKEN_BUDGET; tests pass
    less). With resume=True, continue the interrupted run saved in out_dir/run_state.pth
    (its stored preset is used). `on_speed(preset, tokens_per_s)` is called once, when the
    run has trained for a minute past its first progress update, with the tokens/s of one
    process. Raises PresetError, AllSourcesFailed, TokenizerError, CheckpointError or
    TrainError for problems the user can fix."""
    trainer = Trainer(preset, budget, Path(out_dir), resume, reporter, on_speed)
    trainer.setup()
    return trainer.run()
