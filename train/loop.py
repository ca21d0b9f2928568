"""The training run: data, tokenizer and model from a preset, then exactly `budget`
tokens of AdamW, with evaluation, in-run saves and the end-of-run checkpoint rotation."""
from __future__ import annotations

import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from data import PackedStreams, TextTokenizer, build_tokenizer, eval_documents, eval_windows, open_sources, sample_texts
from data.adaptive import AdaptiveReweighter
from data.prefetch import make_document_stream
from data.registry import AllSourcesDied, DocumentMixer
from model import build_model, count_params, detach_state, map_state

from .checkpoint import (
    RUN_STATE,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_latest,
    load_run_state,
    recover_rotation,
    rotate_checkpoints,
)
from .config import TOKEN_BUDGET, Preset
from .distributed import Dist, all_reduce_sum, any_rank, barrier, broadcast_object, gather_objects, init_distributed
from .estimate import memory_problem, param_count, vocab_size_guess
from .evaluate import evaluate, sample_texts as generate_samples
from .optim import build_optimizer, build_scheduler
from .preset import preset_from_dict
from .progress import Reporter, human
from .tensorboard import CurveLog

CHECKPOINT_FORMAT = 1
MAX_BAD_STEPS = 3  # non-finite steps in a row before rolling back to the last save
MAX_ROLLBACKS = 5  # roll-backs in one run before giving up (the learning rate is then 1/32 of the preset's)


class TrainError(Exception):
    """A run that cannot go on for a reason the user can act on; the message says which."""


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


def interruptible(fn, *args):
    """fn(*args) in a worker thread, so Ctrl-C reaches the main thread at once even while
    fn is inside native code that holds off signals until it returns (the BPE trainer)."""
    box: dict = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=work, daemon=True, name=getattr(fn, "__name__", "worker"))
    worker.start()
    while worker.is_alive():
        worker.join(0.1)  # KeyboardInterrupt is raised here, between joins
    if "error" in box:
        raise box["error"]
    return box["value"]


def pick_device(pref: str, d: Dist) -> torch.device:
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError('train.device is "cuda" but no CUDA device is available; use "auto"')
    return torch.device("cuda", d.local_rank)


def tokens_allowed(remaining: int, micro: int, rank: int, world: int, per_micro: int) -> int:
    """Tokens rank `rank` may train on in micro-step `micro` so the run ends at exactly the
    budget: the last step's remainder is handed out micro-step by micro-step, rank by rank."""
    before = (micro * world + rank) * per_micro
    return max(0, min(per_micro, remaining - before))


def tolerant_load(model: torch.nn.Module, state: dict, report: Reporter) -> int:
    """Load what fits; report missing, unexpected and mis-shaped keys. Returns #tensors loaded."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    misfit = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    unexpected = sorted(k for k in state if k not in own)
    result = model.load_state_dict(fitting, strict=False)
    missing = sorted(set(result.missing_keys) - set(misfit))
    for label, keys in (("missing (kept fresh)", missing), ("unexpected (ignored)", unexpected),
                        ("shape mismatch (kept fresh)", misfit)):
        if keys:
            report.warn(f"{len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    return len(fitting)


def _cat_states(states: list):
    """Join per-row-group states back along the batch dim (the inverse of slicing)."""
    first = states[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    if isinstance(first, dict):
        return {k: _cat_states([s[k] for s in states]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat_states(list(parts)) for parts in zip(*states))
    return first


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _same_architecture(a: dict, b: dict) -> bool:
    keys = ("arch", "d_model", "n_layers", "n_heads")
    return all(a.get(k) == b.get(k) for k in keys)


class Trainer:
    """One run. `train()` below is the entry point; the class keeps the pieces together."""

    def __init__(self, preset: Preset, budget: int, out_dir: Path, resume: bool, reporter: Optional[Reporter]):
        self.out = Path(out_dir)
        self.budget = budget
        self.run_state = None
        if resume:  # the stored preset is the run's, whatever the caller passed (the picker passes None)
            self.run_state = load_run_state(self.out / RUN_STATE)
            preset, _ = preset_from_dict(self.run_state["preset"], f"{self.out / RUN_STATE} (stored preset)")
            self.budget = self.run_state["budget"]
        elif preset is None:
            raise TrainError("no preset to train and no interrupted run to resume")
        self.d = init_distributed(preset.train.device)
        self.rep = reporter or Reporter(enabled=self.d.is_main)
        if not self.d.is_main:
            self.rep.enabled = False
        if resume:
            if self.run_state["world_size"] != self.d.world_size:
                raise TrainError(f"the interrupted run used {self.run_state['world_size']} process(es), this start has "
                                 f"{self.d.world_size}: resume it with the same number, or move "
                                 f"{self.out / RUN_STATE} away to start a new run")
        self.preset, self.cfg = preset, preset.train
        self.device = pick_device(self.cfg.device, self.d)
        # data first: when no source opens, the run stops here, before any file is touched
        self.sources = open_sources(preset.data, log=self.rep.log if self.d.is_main else (lambda m: None))
        self._check_training_documents()
        self._check_memory()
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if recover_rotation(self.out):
                self.rep.warn("finished an interrupted checkpoint rotation from the previous run")
        barrier(self.d)
        # a run's rows in metrics.jsonl carry its id; a resumed run keeps the id it started with
        self.run_id = (self.run_state or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S")
        self.metrics = CurveLog(self.out / "metrics.jsonl", enabled=self.d.is_main, run=self.run_id,
                                log=self.rep.log)  # + TensorBoard files and a terminal loss curve
        self.metrics.write({"kind": "run_start", "preset": preset.name, "resumed": resume, "world_size": self.d.world_size,
                            "tokens": (self.run_state or {}).get("tokens", 0), "budget": self.budget})

    def _check_training_documents(self) -> None:
        """Stop before anything is built when this rank's share of the data holds no
        training document (every file shorter than data.min_text_length, or fewer
        documents than ranks): a fresh reader of the opened sources must yield one."""
        try:
            DocumentMixer(self.sources, self.preset.data, self.d.rank, self.d.world_size,
                          log=lambda m: None).next_document()
            empty = False
        except AllSourcesDied:
            empty = True
        if not any_rank(empty, self.d, self.device):
            return
        names = ", ".join(s.name for s in self.sources)
        if self.d.enabled:
            raise TrainError(f"a rank got no training documents: {names} hold too few documents (of at least "
                             f"data.min_text_length = {self.preset.data.min_text_length} characters, outside the "
                             f"held-out share) for {self.d.world_size} processes; add text or use fewer processes")
        raise TrainError(f"there is nothing to train on: {names} hold no document of at least data.min_text_length = "
                         f"{self.preset.data.min_text_length} characters outside the held-out share; add text "
                         "(or lower data.min_text_length)")

    def _check_memory(self) -> None:
        """Refuse, with the figures, a run that cannot fit in this machine's memory."""
        t, vocab = self.cfg, vocab_size_guess(self.preset.tokenizer)
        problem = memory_problem(self.preset.model, param_count(self.preset.model, vocab), vocab, t.batch_size,
                                 t.seq_length, self.device.type)
        if problem:
            raise TrainError(f"this preset {problem}")

    # -- set-up -----------------------------------------------------------------------
    def setup(self) -> None:
        cfg, d, rep = self.cfg, self.d, self.rep
        torch.manual_seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

        rep.log(f"[data] {len(self.sources)} source(s): {', '.join(s.name for s in self.sources)}")
        init = self._resolve_start()
        self.tokenizer = self._resolve_tokenizer(init)
        self.model = build_model(self.preset.model, self.tokenizer.vocab_size, self.preset.auxiliary)
        if self.run_state is not None:
            try:
                self.model.load_state_dict(self.run_state["model"])
            except RuntimeError:
                raise CheckpointError(f"{self.out / RUN_STATE} holds weights that do not fit its own stored model "
                                      f"({self.preset.model.arch} d{self.preset.model.d_model} L{self.preset.model.n_layers}): "
                                      "it was written by another version or edited; move it away to start a new "
                                      "run") from None
        elif init is not None:
            loaded = tolerant_load(self.model, init[1]["model"], rep)
            self._seed_memory(init[1])
            rep.log(f"[model] continuing from {init[0]} ({loaded} tensors loaded)")
        self.model.to(self.device)
        n_params = count_params(self.model)
        rep.log(f"[model] {self.preset.model.arch}: {n_params / 1e6:.2f}M parameters, vocab {self.tokenizer.vocab_size}, "
                f"device {self.device}, world size {d.world_size}")
        self.n_params = n_params
        self.train_model = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.tokens_per_micro = cfg.batch_size * cfg.seq_length
        self.tokens_per_step = self.tokens_per_micro * cfg.grad_accum_steps * d.world_size
        self.total_steps = math.ceil(self.budget / self.tokens_per_step)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.lr_scale = 1.0  # halved by each roll-back after non-finite steps
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps, self.tokens_per_step,
                                         scale=lambda: self.lr_scale)
        self.splits, self._oom_logged = 1, False  # row groups per micro-batch (doubled on out-of-memory)
        self.skipped_steps, self.bad_streak, self.rollbacks = 0, 0, 0

        documents = make_document_stream(self.sources, self.preset.data, d.rank, d.world_size,
                                         tokenizer=self.tokenizer, log=rep.log if d.is_main else None)
        self.streams = PackedStreams(documents, self.tokenizer.encode_batch, self.tokenizer.eot_id,
                                     cfg.batch_size, cfg.seq_length)
        self.step, self.tokens, self.state = 0, 0, None
        self.next_eval, self.next_save = cfg.eval_every_tokens, cfg.checkpoint_every_tokens
        aux = self.preset.auxiliary
        self.reweighter = None
        if aux.enable_adaptive_sources and len(self.sources) > 1:
            self.reweighter = AdaptiveReweighter(len(self.sources), aux.adaptive_min_weight, aux.adaptive_max_weight,
                                                 aux.adaptive_smoothing)
        self.next_adapt = aux.adaptive_interval_tokens
        self.adapt_sums = torch.zeros(2, len(self.sources), device=self.device)  # loss sum, token count
        if self.run_state is not None:
            self._restore()
        elif getattr(self, "_initial_memory", None):
            self.state = self.model.state_from_memory(self._initial_memory, cfg.batch_size, self.device)
        self._prepare_eval()

    def _resolve_start(self):
        """(name, checkpoint) of the finished run this new run continues from, or None."""
        if self.run_state is not None:
            return None
        latest = load_latest(self.out, warn=self.rep.warn)
        if latest is None:
            return None
        name, ckpt = latest
        if not _same_architecture(ckpt.get("model_config", {}), asdict(self.preset.model)):
            self.rep.warn(f"{name} holds a different model ({ckpt.get('model_config', {}).get('arch')}); "
                          "this run starts from fresh weights (the old file is kept in the rotation)")
            return None
        return latest

    def _resolve_tokenizer(self, init) -> TextTokenizer:
        stored = self.run_state["tokenizer"] if self.run_state is not None else (init[1]["tokenizer"] if init else None)
        if stored is not None:
            tok = TextTokenizer.from_json(stored["json"], stored["spec"])
            wanted = {"type": self.preset.tokenizer.type, "name": self.preset.tokenizer.name,
                      "path": self.preset.tokenizer.path, "vocab_size": self.preset.tokenizer.vocab_size}
            if init is not None and stored["spec"] != wanted:
                self.rep.warn(f"keeping the tokenizer stored in {init[0]} ({stored['spec']['type']}, vocab "
                              f"{tok.vocab_size}) instead of the preset's, so the weights stay meaningful")
            return tok
        # a fresh tokenizer: rank 0 builds it (a BPE is learned from the sources), others receive it
        built = None
        if self.d.is_main:
            tcfg = self.preset.tokenizer
            t0 = time.time()
            texts = sample_texts(self.sources, self.preset.data, tcfg.train_chars) if tcfg.type == "bpe" else None
            tok = interruptible(build_tokenizer, tcfg, texts)
            self.rep.log(f"[tokenizer] {tcfg.type}: vocab {tok.vocab_size} ({time.time() - t0:.1f}s)")
            built = (tok.to_json(), tok.spec)
        js, spec = broadcast_object(built, self.d)
        return TextTokenizer.from_json(js, spec)

    def _prepare_eval(self) -> None:
        self.eval_batches, self.prompts = [], []
        if not self.d.is_main:
            return
        cfg = self.cfg
        per_source = max(20_000, cfg.eval_tokens * 8 // max(1, len(self.sources)))
        docs = eval_documents(self.sources, self.preset.data, per_source)
        ids = self.tokenizer.encode_batch([doc.text for doc in docs]) if docs else []
        self.eval_batches = eval_windows(iter(ids), self.tokenizer.eot_id, min(cfg.batch_size, 8), cfg.seq_length,
                                         cfg.eval_tokens)
        self.prompts = [x[:16] for x in ids[: cfg.samples] if len(x) >= 16]
        if not self.eval_batches:
            self.rep.warn("no held-out text for evaluation (raise data.eval_fraction); evaluation is skipped")
        else:
            n = sum(w[:, 1:].numel() for w in self.eval_batches)
            self.rep.log(f"[eval] {len(docs)} held-out documents, {human(n)} tokens per evaluation")

    # -- checkpoints --------------------------------------------------------------------
    def _rank_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"streams": self.streams.state_dict(), "model_state": map_state(self.state, lambda t: t.cpu()), "rng": rng}

    def _model_cpu_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def save_run_state(self) -> bool:
        """The in-run save. Never writes non-finite weights; a failed write (disk full) is
        reported and training goes on, the previous save intact. True if saved."""
        ranks = gather_objects(self._rank_state(), self.d)
        saved = False
        if self.d.is_main:
            if not all_finite(self.model.parameters()):
                self.rep.warn("weights are not finite: this save is skipped (the previous one is kept)")
            else:
                try:
                    atomic_save({
                        "format": CHECKPOINT_FORMAT, "kind": "run_state", "model": self._model_cpu_state(),
                        "model_config": asdict(self.preset.model), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "step": self.step, "tokens": self.tokens,
                        "budget": self.budget, "world_size": self.d.world_size, "preset": self.preset.to_dict(),
                        "tokenizer": {"json": self.tokenizer.to_json(), "spec": self.tokenizer.spec},
                        "next_eval": self.next_eval, "next_save": self.next_save, "ranks": ranks,
                        "lr_scale": self.lr_scale, "skipped_steps": self.skipped_steps, "splits": self.splits,
                        "reweighter": self.reweighter.state_dict() if self.reweighter else None,
                        "next_adapt": self.next_adapt, "run_id": self.run_id,
                    }, self.out / RUN_STATE)
                    saved = True
                except CheckpointError as e:
                    self.rep.warn(f"in-run save failed: {e}; training goes on")
        barrier(self.d)
        return saved

    def _restore(self) -> None:
        rs = self.run_state
        self.optimizer.load_state_dict(rs["optimizer"])
        self.scheduler.load_state_dict(rs["scheduler"])
        self.step, self.tokens = rs["step"], rs["tokens"]
        self.next_eval, self.next_save = rs["next_eval"], rs["next_save"]
        self.lr_scale, self.skipped_steps = rs.get("lr_scale", 1.0), rs.get("skipped_steps", 0)
        self.splits = rs.get("splits", 1)
        if self.reweighter is not None and rs.get("reweighter") is not None:
            self.reweighter.load_state_dict(rs["reweighter"])
            self.next_adapt = rs["next_adapt"]
        mine = rs["ranks"][self.d.rank]
        self.streams.load_state_dict(mine["streams"])
        self.state = map_state(mine["model_state"], lambda t: t.to(self.device))
        torch.set_rng_state(mine["rng"]["torch"])
        version, internal, gauss = mine["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in mine["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["rng"]["cuda"], self.device)
        self.rep.log(f"[resume] continuing at {human(self.tokens)}/{human(self.budget)} tokens, step {self.step}")

    def _seed_memory(self, ckpt: dict) -> None:
        """Lifelong mode: a new run starts with the memory contents the last one ended with."""
        if ckpt.get("memory") and getattr(self.model, "lifelong", False):
            self._initial_memory = ckpt["memory"]
            self.rep.log("[model] lifelong: starting with the stored procedural/episodic memory contents")

    def final_checkpoint(self, eval_row: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "kind": "final", "model": self._model_cpu_state(),
            "model_config": asdict(self.preset.model), "preset": self.preset.to_dict(),
            "tokenizer": {"json": self.tokenizer.to_json(), "spec": self.tokenizer.spec},
            "tokens": self.tokens, "eval": eval_row, "finished_at": time.time(),
            # in lifelong mode the memory contents are part of what was learned
            "memory": (map_state(self.model.memory_state(self.state), lambda t: t.cpu())
                       if getattr(self.model, "lifelong", False) and self.state is not None else None),
        }

    # -- the loop -------------------------------------------------------------------------
    def _slice_state(self, state, rows: slice):
        return map_state(state, lambda t: t[rows])

    def _forward_backward(self, batches, start_state, remaining: int) -> dict:
        """Forward and backward over the step's micro-batches, each cut into `self.splits`
        row groups (streams); gradients accumulate, the carried state is sliced and
        re-joined so splitting changes memory use, not the result."""
        d, B, T = self.d, self.cfg.batch_size, self.cfg.seq_length
        n_step = min(remaining, self.tokens_per_step)
        n_src = len(self.sources)
        acc = {"loss_sum": torch.zeros((), device=self.device), "src_loss": torch.zeros(n_src, device=self.device),
               "src_count": torch.zeros(n_src, device=self.device), "aux": {}, "metrics": {}}
        state = start_state
        rows_per = math.ceil(B / self.splits)
        groups = [slice(r, min(B, r + rows_per)) for r in range(0, B, rows_per)]
        n_passes = len(batches) * len(groups)
        for micro, batch in enumerate(batches):
            tokens = batch.tokens.to(self.device, non_blocking=True)
            reset = batch.reset.to(self.device, non_blocking=True)
            srcs = batch.sources[:, 1:].to(self.device, non_blocking=True)
            allowed = tokens_allowed(remaining, micro, d.rank, d.world_size, self.tokens_per_micro)
            mask = (torch.arange(self.tokens_per_micro, device=self.device) < allowed).view(B, T)
            new_states = []
            for g, rows in enumerate(groups):
                x, y = tokens[rows, :-1], tokens[rows, 1:]
                last = micro == len(batches) - 1 and g == len(groups) - 1
                with (self.train_model.no_sync() if d.enabled and not last else nullcontext()):
                    with self.autocast():
                        out = self.train_model(x, state=self._slice_state(state, rows), reset_mask=reset[rows])
                    ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
                    keep = mask[rows]
                    if self.model.carries_state:  # the state resets at a boundary: no loss across it
                        keep = keep & (x != self.tokenizer.eot_id)
                    ce = ce * keep
                    # DDP averages gradients over ranks: scale by world size for a mean over all tokens
                    loss = ce.sum() * (d.world_size / n_step)
                    for key, value in out.aux.items():
                        if key.startswith("loss/"):
                            loss = loss + value / n_passes
                            acc["aux"][key] = acc["aux"].get(key, 0.0) + value.detach() / n_passes
                    loss.backward()
                new_states.append(out.state)
                acc["loss_sum"] += ce.detach().sum()
                acc["src_loss"].index_add_(0, srcs[rows].flatten(), ce.detach().flatten())
                acc["src_count"].index_add_(0, srcs[rows].flatten(), mask[rows].flatten().float())
                acc["metrics"] = {k: v for k, v in out.aux.items() if k.startswith("metric/")}
            if self.model.carries_state:
                state = detach_state(new_states[0] if len(new_states) == 1 else _cat_states(new_states))
        acc["state"] = state
        acc["n"] = n_step
        return acc

    def train_step(self) -> dict:
        """One optimizer step. Out of memory: the micro-batch is halved and accumulation
        doubled (same effective batch, same data) and the step is redone. A non-finite
        gradient: the step is skipped and counted; after MAX_BAD_STEPS in a row the run
        rolls back to its last save with half the learning rate."""
        cfg = self.cfg
        batches = [self.streams.next_batch() for _ in range(cfg.grad_accum_steps)]
        start_state = self.state
        remaining = self.budget - self.tokens
        while True:
            try:
                out = self._forward_backward(batches, start_state, remaining)
                break
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.d.enabled or self.splits >= cfg.batch_size:
                    raise TrainError("out of memory even at a micro-batch of one stream; lower train.seq_length or "
                                     "the model size" if not self.d.enabled else
                                     "out of memory on this rank; lower train.batch_size and raise train.grad_accum_steps"
                                     ) from None
                self.splits *= 2
                if not self._oom_logged:
                    self.rep.warn(f"out of memory: micro-batch halved to {math.ceil(cfg.batch_size / self.splits)} "
                                  f"streams, accumulation doubled to {cfg.grad_accum_steps * self.splits} "
                                  "(same effective batch)")
                    self._oom_logged = True
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):  # identical on every rank: gradients are all-reduced
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_streak += 1
            self.rep.warn(f"non-finite loss or gradient at step {self.step + 1}: step skipped "
                          f"({self.skipped_steps} so far)")
            if self.bad_streak >= MAX_BAD_STEPS:
                self._roll_back()
            return {**out, "n": 0, "skipped": True, "grad_norm": grad_norm}
        self.bad_streak = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state = out["state"]
        self.step += 1
        self.tokens += out["n"]
        return {**out, "skipped": False, "grad_norm": grad_norm}

    def _roll_back(self) -> None:
        """Back to the last in-run save (weights, optimizer, data position, state) with the
        learning rate halved; without a save yet, only the learning rate is halved."""
        self.bad_streak = 0
        self.rollbacks += 1
        if self.rollbacks > MAX_ROLLBACKS:
            raise TrainError(f"training keeps producing non-finite values after {MAX_ROLLBACKS} roll-backs with "
                             "lower learning rates; lower train.lr or check the data (the last save is kept)")
        self.lr_scale *= 0.5
        path = self.out / RUN_STATE
        if path.exists():
            scale, skipped = self.lr_scale, self.skipped_steps
            self.run_state = load_checkpoint(path)
            self.model.load_state_dict(self.run_state["model"])
            self._restore()
            self.lr_scale, self.skipped_steps = scale, skipped  # these survive the roll-back
            self.run_state = None
            self.rep.warn(f"{MAX_BAD_STEPS} bad steps in a row: rolled back to the save at "
                          f"{human(self.tokens)} tokens, learning rate x{self.lr_scale:g}")
        else:
            self.rep.warn(f"{MAX_BAD_STEPS} bad steps in a row before any save: learning rate x{self.lr_scale:g}")

    def run(self) -> RunResult:
        cfg, d, rep = self.cfg, self.d, self.rep
        rep.log(f"[train] {human(self.budget)} tokens in {self.total_steps} steps of {human(self.tokens_per_step)} tokens "
                f"({d.world_size} x {cfg.grad_accum_steps} x {cfg.batch_size} streams x {cfg.seq_length})")
        rep.start(self.budget, self.tokens)
        window = {"loss": torch.zeros((), device=self.device), "n": 0, "t": time.perf_counter(), "tokens": self.tokens,
                  "src_loss": torch.zeros(len(self.sources), device=self.device),
                  "src_count": torch.zeros(len(self.sources), device=self.device)}
        last_eval: dict = {}
        stopped = False
        self.model.train()
        try:
            with StopFlag() as stop:
                while self.tokens < self.budget:
                    out = self.train_step()
                    if not out["skipped"]:
                        window["loss"] += out["loss_sum"]
                        window["n"] += out["n"]
                        window["src_loss"] += out["src_loss"]
                        window["src_count"] += out["src_count"]
                        if self.reweighter is not None:
                            self.adapt_sums += torch.stack([out["src_loss"], out["src_count"]])
                            if self.tokens >= self.next_adapt:
                                self._reweight()
                    if self.step % cfg.log_every_steps == 0 or self.tokens >= self.budget:
                        self._log(window, out)
                    if self.tokens >= self.next_eval and self.tokens < self.budget:
                        last_eval = self._evaluate(samples=True)
                        self.next_eval += cfg.eval_every_tokens
                    if self.tokens >= self.next_save and self.tokens < self.budget:
                        self.save_run_state()
                        self.next_save += cfg.checkpoint_every_tokens
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
            rep.log(f"[stop] saved the run at {human(self.tokens)}/{human(self.budget)} tokens to "
                    f"{self.out / RUN_STATE}; start again and press Enter to resume")
            return RunResult(self.tokens, self.step, False, last_eval, self.out / RUN_STATE, stop.signum)
        last_eval = self._evaluate(samples=True)
        if d.is_main:
            if not all_finite(self.model.parameters()):
                raise TrainError("the final weights are not finite; they were not saved (the last in-run save is "
                                 f"kept in {self.out / RUN_STATE})")
            rotate_checkpoints(self.final_checkpoint(last_eval), self.out)
            (self.out / RUN_STATE).unlink(missing_ok=True)
            rep.log(f"[done] {human(self.tokens)} tokens; checkpoint {self.out / 'lm_current.pth'}"
                    + (f"; held-out loss {last_eval['eval_loss']:.3f} (ppl {last_eval['eval_ppl']:.1f})" if last_eval else ""))
        barrier(d)
        return RunResult(self.tokens, self.step, True, last_eval, self.out / "lm_current.pth")

    def _reweight(self) -> None:
        """Adaptive source weights: each source's mean training loss over the interval
        (summed over ranks) moves its weight; higher loss, more turns."""
        sums = all_reduce_sum(self.adapt_sums.clone(), self.d)
        losses = [(l / c).item() if c > 0 else None for l, c in zip(sums[0], sums[1])]
        weights = self.reweighter.update(losses)
        self.streams.documents.set_weights(weights)
        self.adapt_sums.zero_()
        self.next_adapt += self.preset.auxiliary.adaptive_interval_tokens
        named = {s.name: round(w, 3) for s, w in zip(self.sources, weights)}
        self.metrics.write({"kind": "source_weights", "step": self.step, "tokens": self.tokens, "weights": named,
                            "source_loss": {s.name: l for s, l in zip(self.sources, losses)}})
        self.rep.log(f"[data] source weights at {human(self.tokens)} tokens: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in named.items()))

    def _log(self, window: dict, out: dict) -> None:
        d = self.d
        packed = torch.cat([window["loss"].view(1), window["src_loss"], window["src_count"]])
        packed = all_reduce_sum(packed, d)
        n_src = len(self.sources)
        now = time.perf_counter()
        tokens_per_s = (self.tokens - window["tokens"]) / max(1e-9, now - window["t"])
        loss = packed[0].item() / max(1, self.tokens - window["tokens"])
        lr = self.scheduler.get_last_lr()[0]
        row = {"kind": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
               "tokens_per_s": tokens_per_s, "grad_norm": float(out["grad_norm"]), "skipped_steps": self.skipped_steps}
        src_l, src_c = packed[1:1 + n_src], packed[1 + n_src:]
        if n_src > 1:
            row["source_loss"] = {s.name: (src_l[i] / src_c[i]).item() for i, s in enumerate(self.sources) if src_c[i] > 0}
        for key, value in {**out["aux"], **out["metrics"]}.items():
            row[key] = float(value)
        total = loss + sum(float(v) for v in out["aux"].values())  # CE + the weighted auxiliary terms
        if out["aux"]:
            row["loss_total"] = total
        for key, value in out["aux"].items():
            row[f"share/{key.split('/', 1)[1]}"] = float(value) / max(total, 1e-12)
        self.metrics.write(row)
        detail = "  ".join(f"{k.split('/', 1)[1]} {float(v):.3g} ({100 * float(v) / max(total, 1e-12):.1f}%)"
                           for k, v in out["aux"].items())
        detail += block_summary(out["metrics"])
        self.rep.update(self.tokens, loss, lr, tokens_per_s, detail)
        window.update(loss=torch.zeros((), device=self.device), n=0, t=now, tokens=self.tokens,
                      src_loss=torch.zeros(n_src, device=self.device), src_count=torch.zeros(n_src, device=self.device))

    def _evaluate(self, samples: bool) -> dict:
        row: dict = {}
        if self.d.is_main and self.eval_batches:
            row = evaluate(self.model, self.eval_batches, self.tokenizer.eot_id, self.device, self.autocast)
            self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens, **row})
            self.rep.log(f"[eval] {human(self.tokens)} tokens: held-out loss {row['eval_loss']:.3f}, "
                         f"perplexity {row['eval_ppl']:.1f}")
            if samples and self.prompts:
                for prompt, text in generate_samples(self.model, self.tokenizer, self.prompts, self.cfg.sample_tokens,
                                                     seed=self.step):
                    self.rep.log(f"  [sample] {prompt!r} -> {text!r}", style="dim")
        barrier(self.d)
        return row


# per-block metrics shown (averaged over blocks) on the progress detail line
DETAIL_METRICS = (("spike_rate", "spike rate"), ("pm_commit_rate", "PM commits"), ("pm_strength", "PM strength"),
                  ("em_write_rate", "EM writes"), ("em_strength", "EM strength"), ("em_read_share", "EM share"))


def block_summary(metrics: dict) -> str:
    """'  spike rate 0.12  PM commits 0.50 ...' from "metric/<name>/layer<i>" values, each
    averaged over the blocks that report it ('' when none do)."""
    parts = []
    for name, label in DETAIL_METRICS:
        vals = [float(v) for k, v in metrics.items() if k.startswith(f"metric/{name}/")]
        if vals:
            parts.append(f"{label} {sum(vals) / len(vals):.2f}")
    return "".join(f"  {p}" for p in parts)


def train(preset: Optional[Preset], budget: int = TOKEN_BUDGET, out_dir: str | Path = "checkpoints", resume: bool = False,
          reporter: Optional[Reporter] = None) -> RunResult:
    """Train `preset` for `budget` tokens (the product always uses TOKEN_BUDGET; tests pass
    less). With resume=True, continue the interrupted run saved in out_dir/run_state.pth
    (its stored preset is used). Raises PresetError, AllSourcesFailed, TokenizerError,
    CheckpointError or TrainError for problems the user can fix."""
    trainer = Trainer(preset, budget, Path(out_dir), resume, reporter)
    trainer.setup()
    return trainer.run()
