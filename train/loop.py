"""The training run: exactly `budget` tokens of AdamW on a preset's data, with periodic
evaluation, in-run saves and the end-of-run checkpoint rotation.

`train()` makes a Trainer. Its constructor checks what can be checked before anything
heavy starts (the stored run when resuming, the sources, the memory); `setup()` builds
the pieces (train/assemble.py) and the components that keep the run's books, each owning
its state: the progress log (progress.py), adaptive source weights (source_weights.py),
the held-out evaluation (heldout.py), and the checkpointer (checkpointer.py) that every
stateful piece is registered with and that restores them all when resuming. `run()` is
the loop: one step, each component's `after_step`, an evaluation and an in-run save when
due, a requested stop; at the budget the final evaluation and the checkpoint rotation."""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from data import open_sources
from model import build_model, count_params, map_state
from model.ops import report as ops_report, report_lines as ops_report_lines
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
from .checkpoint_files import NEXT, RUN_STATE, PrimaryWrites, atomic_save, recover_rotation, rotate_checkpoints
from .checkpointer import Checkpointer, finished_checkpoint, load_run_state
from .distributed import any_rank, barrier, from_rank_0, init_distributed
from .errors import TrainError
from .heldout import Evaluation
from .metrics import CurveLog
from .optim import build_optimizer, build_scheduler
from .progress import ProgressLog, Reporter, SpeedReport, human
from .resize import kept_accumulation, resized_ranks
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


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Trainer:
    """One run: the constructor's checks, `setup()`, then `run()` (train() does all three)."""

    def __init__(self, preset: Optional[Preset], budget: int, out_dir: Path, resume: bool,
                 reporter: Optional[Reporter], on_speed: Optional[Callable[[Preset, float], None]] = None,
                 stop_at: Optional[int] = None):
        self.out, self.budget, self.stored = Path(out_dir), budget, None
        self.stop_at = stop_at
        self.speed = SpeedReport(on_speed)
        if preset is None and not resume:
            raise TrainError("no preset to train and no interrupted run to resume")
        self.ddp = init_distributed(preset.train.device if preset is not None else "auto")
        if resume:  # the stored preset is the run's, whatever the caller passed (the picker passes None)
            # global rank 0 reads the save and sends it: other nodes' disks need not hold it
            self.stored = from_rank_0(lambda: load_run_state(self.out / RUN_STATE), self.ddp)
            preset, _ = preset_from_dict(self.stored["preset"], f"{self.out / RUN_STATE} (stored preset)")
            self.budget = self.stored["budget"]
        self.reporter = reporter or Reporter(enabled=self.ddp.is_main)
        if not self.ddp.is_main:
            self.reporter.enabled = False
        self.preset, self.cfg = preset, preset.train
        self.device = pick_device(self.cfg.device, self.ddp)
        # data first: when no source opens, the run stops here, before any file is touched
        self.sources = open_sources(preset.data, log=self.reporter.log if self.ddp.is_main else (lambda m: None))
        if resume and len(self.sources) < len(preset.data.sources):
            # the save's stream positions and buffers are per source: with one gone they point nowhere
            from data.registry import source_label

            opened = {s.name for s in self.sources}
            gone = [source_label(spec) for spec in preset.data.sources if source_label(spec) not in opened]
            raise TrainError(f"the interrupted run in {self.out} read {len(preset.data.sources)} sources and "
                             f"{', '.join(gone) or 'some'} cannot be opened now (the lines above say why): make "
                             f"{'it' if len(gone) == 1 else 'them'} readable again and resume, or move "
                             f"{self.out / RUN_STATE} away to start a new run")
        check_training_documents(self.sources, preset.data, self.ddp, self.device)
        check_memory(preset, self.device)
        if self.ddp.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if recover_rotation(self.out):
                self.reporter.warn("finished an interrupted checkpoint rotation from the previous run")
        barrier(self.ddp)
        # a run's rows in metrics.jsonl carry its id; a resumed run keeps the id it started with
        self.run_id = (self.stored or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S")
        self.metrics = CurveLog(self.out / "metrics.jsonl", enabled=self.ddp.is_main, run=self.run_id,
                                log=self.reporter.log)  # + TensorBoard files and a terminal loss curve
        self.metrics.write({"kind": "run_start", "preset": preset.name, "resumed": resume, "world_size": self.ddp.world_size,
                            "tokens": self.stored["counters"]["tokens"] if self.stored else 0, "budget": self.budget,
                            "sources": [s.name for s in self.sources]})

    def setup(self) -> None:
        """Build the run's pieces; when resuming, the checkpointer restores every stateful one."""
        cfg, ddp, reporter, preset = self.cfg, self.ddp, self.reporter, self.preset
        self.autocast = seed_and_precision(cfg, ddp.rank, self.device)
        names = [s.name for s in self.sources]  # many sources: the first few, the rest in metrics.jsonl's run_start row
        reporter.log(f"[data] {len(names)} source(s): " + (", ".join(names) if len(names) <= 8 else
                     f"{', '.join(names[:5])} and {len(names) - 5} more (all of them in the run_start row of "
                     f"{self.out / 'metrics.jsonl'})"))
        # the finished run this one continues from: rank 0's, sent to all (other nodes' disks need not hold it)
        start = None if self.stored else from_rank_0(lambda: continue_from(self.out, asdict(preset.model),
                                                                          reporter.warn), ddp)
        stored = self.stored or (start[1] if start else None)
        self.tokenizer = choose_tokenizer(preset, self.sources, stored and stored["tokenizer"], start and start[0], ddp, reporter)
        self.model = build_model(preset.model, self.tokenizer.vocab_size, preset.auxiliary)
        if start is not None:
            loaded = tolerant_load(self.model, start[1]["model"], reporter)
            reporter.log(f"[model] continuing from {start[0]} ({loaded} tensors loaded)")
        self.model.to(self.device)
        self.n_params = count_params(self.model)
        reporter.log(f"[model] {preset.model.arch}: {self.n_params / 1e6:.2f}M parameters, vocab {self.tokenizer.vocab_size}, "
                     f"device {self.device}, world size {ddp.world_size}")
        self.train_model = wrap_for_training(self.model, cfg.compile, ddp, self.device)

        self.schedule_anchor = (self.stored or {}).get("schedule")
        if self.stored and self.stored["world_size"] != ddp.world_size:
            self._resize()
        self.tokens_per_step = cfg.batch_size * cfg.seq_length * cfg.grad_accum_steps * ddp.world_size
        self.total_steps = math.ceil(self.budget / self.tokens_per_step)
        self.faults = Faults(cfg.batch_size, cfg.grad_accum_steps, ddp.enabled, reporter.warn)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = self._schedule()
        self.streams = training_streams(self.sources, preset, self.tokenizer, ddp, reporter.log)
        self.counters = Counters(next_eval=cfg.eval_every_tokens, next_save=cfg.checkpoint_every_tokens)
        self.carried = CarriedState(self.device)
        if start is not None and start[1].get("memory") and getattr(self.model, "lifelong", False):
            # lifelong mode: a new run starts with the memory contents the last one ended with
            self.carried.value = self.model.state_from_memory(start[1]["memory"], cfg.batch_size, self.device)
            reporter.log("[model] lifelong: starting with the stored procedural/episodic memory contents")
        self.one_step = TrainStep(self.model, self.train_model, self.optimizer, self.scheduler, self.faults,
                                  self.carried, self.autocast, cfg, ddp, self.device, self.tokenizer.eot_id,
                                  len(self.sources))
        aux, names = preset.auxiliary, [s.name for s in self.sources]
        self.adaptive = None
        if aux.enable_adaptive_sources and len(self.sources) > 1:
            self.adaptive = AdaptiveSources(aux, names, self.device, self.ddp, self.streams.documents, self.metrics,
                                            reporter.log)
        self.progress = ProgressLog(cfg.log_every_steps, names, self.device, self.ddp, self.scheduler, self.faults,
                                    self.metrics, reporter, self.speed, preset)

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
                    "budget": self.budget, "world_size": ddp.world_size, "run_id": self.run_id,
                    "schedule": self.schedule_anchor}
        self.checkpointer = Checkpointer(ddp, identity, shared, {"streams": self.streams, "carried": self.carried,
                                                               "rng": RngState(self.device)})
        if self.stored is not None:
            self.checkpointer.load_state_dict(self.stored)
            reporter.log(f"[resume] continuing at {human(self.counters.tokens)}/{human(self.budget)} tokens, "
                         f"step {self.counters.step}")
        windows, prompts = held_out(self.sources, preset, self.tokenizer, ddp, reporter)
        self.evaluation = Evaluation(windows, prompts, self.tokenizer, cfg.sample_tokens, self.device, self.autocast,
                                     ddp, self.metrics, reporter)

    def _resize(self) -> None:
        """An interrupted run resumed on another number of processes: the global batch kept
        where it divides, every rank's data re-sharded (rank 0 replays the old shares, the
        others receive the result), one line saying what changed. When the global batch
        cannot be kept, the learning-rate schedule is anchored here and followed by tokens."""
        cfg, ddp, old_world = self.cfg, self.ddp, self.stored["world_size"]
        old_accum = cfg.grad_accum_steps
        accum = kept_accumulation(old_accum, old_world, ddp.world_size)
        ranks, repeated = from_rank_0(lambda: resized_ranks(self.stored["ranks"], self.sources, self.preset.data,
                                                            ddp.world_size, cfg.batch_size), ddp)
        self.stored = {**self.stored, "ranks": ranks}
        old_tokens_per_step = cfg.batch_size * cfg.seq_length * old_accum * old_world
        if accum is not None:
            cfg.grad_accum_steps = accum
            batch = f"global batch kept (grad_accum_steps {old_accum} -> {accum})"
        else:
            anchor = self.schedule_anchor or {"tokens_per_step": old_tokens_per_step,
                                              "total_steps": math.ceil(self.budget / old_tokens_per_step)}
            counters = self.stored["counters"]
            self.schedule_anchor = {**anchor, "step": counters["step"], "tokens": counters["tokens"]}
            batch = (f"global batch {old_tokens_per_step} -> {old_tokens_per_step * ddp.world_size // old_world} "
                     f"tokens a step (grad_accum_steps {old_accum} cannot keep it), the learning-rate schedule "
                     "followed by tokens")
        self.reporter.log(f"[resume] the run used {old_world} process(es), this start has {ddp.world_size}: {batch}; "
                          f"data re-sharded over {ddp.world_size} reader(s), {repeated} document(s) will be read twice")
        self.metrics.write({"kind": "resized", "from_world_size": old_world, "world_size": ddp.world_size,
                            "grad_accum_steps": cfg.grad_accum_steps, "repeated_documents": repeated})

    def _schedule(self):
        """The learning-rate schedule: over this run's steps, or, after a resume that changed
        the global batch, the original schedule followed by tokens from the anchor on."""
        cfg, anchor = self.cfg, self.schedule_anchor
        if anchor is None:
            return build_scheduler(self.optimizer, cfg, self.total_steps, self.tokens_per_step,
                                   scale=lambda: self.faults.lr_scale)

        def position(s: int) -> float:  # the original schedule's step at the tokens step s reaches
            return (anchor["tokens"] + (s - anchor["step"]) * self.tokens_per_step) / anchor["tokens_per_step"]
        return build_scheduler(self.optimizer, cfg, anchor["total_steps"], anchor["tokens_per_step"],
                               scale=lambda: self.faults.lr_scale, position=position)

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
            self.reporter.warn(f"{MAX_BAD_STEPS} bad steps in a row: rolled back to the save at "
                               f"{human(self.counters.tokens)} tokens, learning rate x{self.faults.lr_scale:g}")
        else:
            self.reporter.warn(f"{MAX_BAD_STEPS} bad steps in a row before any save: learning rate "
                               f"x{self.faults.lr_scale:g}")

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Steps until the budget; after each, the components' bookkeeping (progress, source
        weights, evaluation, the in-run save) and a requested stop. Then the final
        evaluation and the checkpoint rotation, or the stop save."""
        cfg, counters = self.cfg, self.counters
        self.reporter.log(f"[train] {human(self.budget)} tokens in {self.total_steps} steps of "
                          f"{human(self.tokens_per_step)} tokens ({self.ddp.world_size} x {cfg.grad_accum_steps} x "
                          f"{cfg.batch_size} streams x {cfg.seq_length})")
        self.reporter.start(self.budget, counters.tokens)
        self.progress.restart(counters.tokens)
        last_eval: dict = {}
        stopped, kernels_said = False, False
        self.model.train()
        try:
            with StopFlag() as stop:
                while counters.tokens < self.budget:
                    out = self.train_step()
                    if not kernels_said:
                        kernels_said = self._record_kernels()
                    self.progress.after_step(out, counters, self.budget)
                    if self.adaptive is not None:
                        self.adaptive.after_step(out, counters)
                    if counters.tokens >= counters.next_eval and counters.tokens < self.budget:
                        last_eval = self.evaluation.run(self.model, counters, samples=True)
                        counters.next_eval += cfg.eval_every_tokens
                    if counters.tokens >= counters.next_save and counters.tokens < self.budget:
                        self.save_run_state()
                        counters.next_save += cfg.checkpoint_every_tokens
                    if any_rank(stop.requested, self.ddp, self.device) or self._reached_stop_at():
                        stopped = True
                        break
        finally:
            self.reporter.close()
            close = getattr(self.streams.documents, "close", None)
            if close is not None:
                close()  # background data workers
        if stopped:
            return self._stop(last_eval, stop.signum)
        return self._finish(self.evaluation.run(self.model, counters, samples=True))

    def _reached_stop_at(self) -> bool:
        return self.stop_at is not None and self.stop_at <= self.counters.tokens < self.budget

    def _record_kernels(self) -> bool:
        """After the first step that ran the fast ops, what ran for each (model.ops.report():
        the compiled C loop, Triton, fla or the reference): one line per op on the display
        (rank 0) and a `kernels` row in the metrics. True once said."""
        if self.preset.model.arch != "hatchling":  # the transformer runs no fast op (the report is per process)
            return True
        ran = ops_report()
        if not ran:
            return False
        for line in ops_report_lines():
            self.reporter.log(line)
        self.metrics.write({"kind": "kernels", "step": self.counters.step, **ran})
        return True

    def _stop(self, last_eval: dict, signum: Optional[int]) -> RunResult:
        """The stop save, and how to resume."""
        n = self.counters
        if not self.save_run_state():
            self.reporter.warn("the stop could not be saved; the run resumes from its previous save")
        self.reporter.log(f"[stop] saved the run at {human(n.tokens)}/{human(self.budget)} tokens to "
                          f"{self.out / RUN_STATE}; start again and press Enter to resume")
        return RunResult(n.tokens, n.step, False, last_eval, self.out / RUN_STATE, signum)

    def _finish(self, last_eval: dict) -> RunResult:
        """The finished run's checkpoint rotated in, its in-run save removed."""
        n = self.counters
        failed = None  # why the rotation still fails after its retries
        if self.ddp.is_main:
            if not all_finite(self.model.parameters()):
                raise TrainError("the final weights are not finite; they were not saved (the last in-run save is "
                                 f"kept in {self.out / RUN_STATE})")
            final = self.final_checkpoint(last_eval)
            failed = self.primary_writes().run(lambda: rotate_checkpoints(final, self.out), self.out / NEXT)
        if any_rank(failed is not None, self.ddp, self.device):  # the finished run's state goes elsewhere (rc 2)
            self.primary_writes().elsewhere(self.checkpointer.state_dict(), failed, "the finished run")
        if self.ddp.is_main:
            try:
                (self.out / RUN_STATE).unlink(missing_ok=True)
            except OSError as e:
                self.reporter.warn(f"could not remove {self.out / RUN_STATE} ({e.strerror}): the run is finished; "
                                   "remove the file, or the next start offers to resume it")
            self.reporter.log(f"[done] {human(n.tokens)} tokens; checkpoint {self.out / 'lm_current.pth'}"
                              + (f"; held-out loss {last_eval['eval_loss']:.3f} (ppl {last_eval['eval_ppl']:.1f})"
                                 if last_eval else ""))
        barrier(self.ddp)
        return RunResult(n.tokens, n.step, True, last_eval, self.out / "lm_current.pth")

    # -- saves ------------------------------------------------------------------------------
    def save_run_state(self) -> bool:
        """The in-run save and the stop save (every rank takes part). Never writes non-finite
        weights. A failing write is retried (train/checkpoint_files.py PrimaryWrites); when
        it keeps failing the state goes to a fallback folder and SavedElsewhere (or
        NothingSaved) stops the run. True if saved."""
        state = self.checkpointer.state_dict()
        saved, failed = False, None
        if self.ddp.is_main:
            if not all_finite(self.model.parameters()):
                self.reporter.warn("weights are not finite: this save is skipped (the previous one is kept)")
            else:
                failed = self.primary_writes().run(lambda: atomic_save(state, self.out / RUN_STATE), self.out / RUN_STATE)
                saved = failed is None
        if any_rank(failed is not None, self.ddp, self.device):
            self.primary_writes().elsewhere(state, failed)
        return saved

    def primary_writes(self) -> PrimaryWrites:
        return PrimaryWrites(self.out, self.reporter, self.ddp.enabled)

    def final_checkpoint(self, eval_row: dict) -> dict:
        memory = None  # in lifelong mode the memory contents are part of what was learned
        if getattr(self.model, "lifelong", False) and self.carried.value is not None:
            memory = map_state(self.model.memory_state(self.carried.value), lambda t: t.cpu())
        return finished_checkpoint(self.weights.state_dict(), self.preset, self.tokenizer, self.counters.tokens,
                                   eval_row, memory)


def train(preset: Optional[Preset], budget: int = TOKEN_BUDGET, out_dir: str | Path = "checkpoints", resume: bool = False,
          reporter: Optional[Reporter] = None, on_speed: Optional[Callable[[Preset, float], None]] = None,
          stop_at: Optional[int] = None) -> RunResult:
    """Train `preset` for `budget` tokens (the product always uses TOKEN_BUDGET; tests pass
    less). With resume=True, continue the interrupted run saved in out_dir/run_state.pth
    (its stored preset is used). `on_speed(preset, tokens_per_s)` is called once, when the
    run has trained for a minute past its first progress update, with the tokens/s of one
    process. `stop_at` stops the run, saved as an interrupted one, at the first step that
    reaches that many tokens (a bench evaluates points along one schedule this way, resuming
    the run after each). Raises PresetError, AllSourcesFailed, TokenizerError, CheckpointError or
    TrainError for problems the user can fix (FolderError, a CheckpointError, when out_dir
    cannot take a run or another run trains there: train/run_lock.py)."""
    from .run_lock import claim_folder, release_folder

    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 holds the folder's lock
    if main:
        claim_folder(out_dir)
    try:
        trainer = Trainer(preset, budget, Path(out_dir), resume, reporter, on_speed, stop_at)
        trainer.setup()
        return trainer.run()
    finally:
        if main:
            release_folder(out_dir)
