"""Putting a run together from its preset: the device, the checks that stop a run before
anything heavy starts, the finished run a new run continues from, the tokenizer, the
model, the training streams and the held-out windows. Each function builds one piece;
train/loop.py calls them in order."""
from __future__ import annotations

import random
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

from data import (
    PackedStreams,
    TextTokenizer,
    build_tokenizer,
    eval_documents,
    eval_windows,
    make_document_stream,
    sample_texts,
)
from data.registry import AllSourcesDied, DocumentMixer

from .checkpoint_files import load_latest
from .distributed import Dist, any_rank, broadcast_object
from .errors import TrainError
from .memory_check import memory_problem, param_count, vocab_size_guess
from .progress import human

# The fields of two model configs that must agree for one's weights to be worth
# continuing from in the other: the kind of network, its width, depth and heads.
# Whatever else differs (memories a later phase turns on, a different MLP width) is
# sorted out tensor by tensor by tolerant_load, which keeps what does not fit fresh.
BACKBONE = ("arch", "d_model", "n_layers", "n_heads")


def pick_device(pref: str, ddp: Dist) -> torch.device:
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError('train.device is "cuda" but no CUDA device is available; use "auto"')
    return torch.device("cuda", ddp.local_rank)


def check_training_documents(sources, data_cfg, ddp: Dist, device: torch.device) -> None:
    """Stop before anything is built when this rank's share of the data holds no
    training document (every file shorter than data.min_text_length, or fewer
    documents than ranks): a fresh reader of the opened sources must yield one."""
    try:
        DocumentMixer(sources, data_cfg, ddp.rank, ddp.world_size, log=lambda m: None).next_document()
        empty = False
    except AllSourcesDied:
        empty = True
    if not any_rank(empty, ddp, device):
        return
    names = ", ".join(s.name for s in sources)
    if ddp.enabled:
        raise TrainError(f"a rank got no training documents: {names} hold too few documents (of at least "
                         f"data.min_text_length = {data_cfg.min_text_length} characters, outside the held-out "
                         f"share) for {ddp.world_size} processes; add text or use fewer processes")
    raise TrainError(f"there is nothing to train on: {names} hold no document of at least data.min_text_length = "
                     f"{data_cfg.min_text_length} characters outside the held-out share; add text "
                     "(or lower data.min_text_length)")


def check_memory(preset, device: torch.device) -> None:
    """Refuse, with the figures, a run that cannot fit in this machine's memory."""
    t, vocab = preset.train, vocab_size_guess(preset.tokenizer)
    problem = memory_problem(preset.model, param_count(preset.model, vocab), vocab, t.batch_size, t.seq_length,
                             device.type)
    if problem:
        raise TrainError(f"this preset {problem}")


def seed_and_precision(cfg, rank: int, device: torch.device) -> Callable:
    """Seed this rank's generators; TF32 on CUDA; the autocast context the preset asks for."""
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def same_backbone(a: dict, b: dict) -> bool:
    """Whether two model configs (as dicts) agree on every BACKBONE field."""
    return all(a.get(k) == b.get(k) for k in BACKBONE)


def continue_from(out: Path, model_cfg: dict, warn: Callable[[str], None]) -> Optional[tuple[str, dict]]:
    """(file name, checkpoint) of the finished run a new run continues from: the newest
    that loads and has the same backbone; None to start from fresh weights."""
    latest = load_latest(out, warn=warn)
    if latest is None:
        return None
    name, ckpt = latest
    if not same_backbone(ckpt.get("model_config", {}), model_cfg):
        warn(f"{name} holds a different model ({ckpt.get('model_config', {}).get('arch')}); "
             "this run starts from fresh weights (the old file is kept in the rotation)")
        return None
    return latest


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


def choose_tokenizer(preset, sources, stored: Optional[dict], stored_in: Optional[str], ddp: Dist, reporter) -> TextTokenizer:
    """The tokenizer stored with the run being resumed or continued (`stored`, from the
    file `stored_in` when continuing), else a fresh one: rank 0 builds it (a BPE is
    learned from the sources) and the other ranks receive it."""
    if stored is not None:
        tok = TextTokenizer.from_json(stored["json"], stored["spec"])
        t = preset.tokenizer
        wanted = {"type": t.type, "name": t.name, "path": t.path, "vocab_size": t.vocab_size}
        if stored_in is not None and stored["spec"] != wanted:
            reporter.warn(f"keeping the tokenizer stored in {stored_in} ({stored['spec']['type']}, vocab "
                          f"{tok.vocab_size}) instead of the preset's, so the weights stay meaningful")
        return tok
    built = None
    if ddp.is_main:
        tcfg = preset.tokenizer
        t0 = time.time()
        texts = sample_texts(sources, preset.data, tcfg.train_chars) if tcfg.type == "bpe" else None
        tok = interruptible(build_tokenizer, tcfg, texts)
        reporter.log(f"[tokenizer] {tcfg.type}: vocab {tok.vocab_size} ({time.time() - t0:.1f}s)")
        built = (tok.to_json(), tok.spec)
    js, spec = broadcast_object(built, ddp)
    return TextTokenizer.from_json(js, spec)


def tolerant_load(model: torch.nn.Module, state: dict, report) -> int:
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


def wrap_for_training(model: torch.nn.Module, compile: bool, ddp: Dist, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: compiled when asked, data-parallel under torchrun."""
    from model.ops.boundary import compile_model

    wrapped = compile_model(model) if compile else model  # the ops' data-dependent choices break the graph
    if ddp.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


def training_streams(sources, preset, tokenizer: TextTokenizer, ddp: Dist, log) -> PackedStreams:
    """This rank's B persistent token streams over its share of the training documents."""
    cfg = preset.train
    documents = make_document_stream(sources, preset.data, ddp.rank, ddp.world_size, tokenizer=tokenizer,
                                     log=log if ddp.is_main else None)
    return PackedStreams(documents, tokenizer.encode_batch, tokenizer.eot_id, cfg.batch_size, cfg.seq_length)


def held_out(sources, preset, tokenizer: TextTokenizer, ddp: Dist, reporter) -> tuple[list, list]:
    """(evaluation windows, sample prompts), on rank 0 only (the others evaluate nothing)."""
    if not ddp.is_main:
        return [], []
    cfg = preset.train
    per_source = max(20_000, cfg.eval_tokens * 8 // max(1, len(sources)))
    docs = eval_documents(sources, preset.data, per_source)
    ids = tokenizer.encode_batch([doc.text for doc in docs]) if docs else []
    windows = eval_windows(iter(ids), tokenizer.eot_id, min(cfg.batch_size, 8), cfg.seq_length, cfg.eval_tokens)
    prompts = [x[:16] for x in ids[: cfg.samples] if len(x) >= 16]
    if not windows:
        reporter.warn("no held-out text for evaluation (raise data.eval_fraction); evaluation is skipped")
    else:
        n = sum(w[:, 1:].numel() for w in windows)
        reporter.log(f"[eval] {len(docs)} held-out documents, {human(n)} tokens per evaluation")
    return windows, prompts
