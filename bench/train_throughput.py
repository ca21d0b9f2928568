"""Training-step throughput: our models vs Hugging Face's GPT2LMHeadModel at the same
dimensions, all measured in ONE process, interleaved. One JSON line per model on stdout:

  {"bench": "train_throughput", "model": "ours-hatchling", "seq_length": 256, "tokens_per_s": ...,
   "step_ms": ..., "params": ..., "ratio_vs_transformer": ..., "ratio_vs_gpt2": ..., "rounds": [...]}

A step is a full optimizer step: forward, cross-entropy, backward, clipping, AdamW, as the
trainer does it (bf16 autocast on CUDA, fp32 on CPU). Every model is built once; then
each round runs `--steps` timed steps of every model in turn (after `--warmup` untimed
ones), and the figure reported is the median over `--rounds` rounds. Interleaving makes
machine noise (other jobs on a shared 2-core box) hit all models alike; separate
processes drift by 2x between runs. On CUDA, peak memory is per model (reset per step).

Models (`--models`, comma list): gpt2 (HF GPT2LMHeadModel), transformer (ours, same
dimensions), transformer-matched (ours, its MLP widened to the hatchling's parameter
count, bench/quality.py's rule), hatchling (phase A: backbone + WM, its window one
sequence long and its spike floors as in the shipped presets, unless --preset says
otherwise), hatchling-B (+ procedural memory), hatchling-C (+ episodic memory),
baby-hatchling (seed 002's public Spike-KDA code, imported from a checkout given by
--peer, never copied here; see build_peer), hatchling-baseline (the phase-A hatchling of
another checkout of this project, given by --baseline: before/after a change in one
process; the hatchling row then reports `ratio_vs_baseline`). Hatchling phases also
report `ratio_vs_phase_a`. Any name with `-eager` appended (`hatchling-eager`) is that
model never compiled: under --compile its compiled row reports `ratio_vs_eager`.

    python bench/train_throughput.py                                  # d 256, 8 layers, vocab 8192, 2048 tokens a step, T=256
    python bench/train_throughput.py --seq-lengths 256,1024,4096      # batch = tokens-per-step / T
    python bench/train_throughput.py --models transformer,hatchling --compile
    python bench/train_throughput.py --models hatchling,hatchling-eager --compile   # compiled vs eager
    python bench/train_throughput.py --profile hatchling              # torch.profiler top ops of one step
    python bench/train_throughput.py --preset configs/00_best_general.json
    python bench/train_throughput.py --models transformer,hatchling,baby-hatchling --peer ../baby-hatchling
    git worktree add ../before <commit> && python bench/train_throughput.py \
        --models transformer,transformer-matched,hatchling,hatchling-baseline --baseline ../before
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIZES = {  # d_model, n_layers, n_heads, seq_length, batch, vocab
    "tiny": (128, 2, 4, 128, 8, 4096),
    "small": (256, 4, 4, 256, 8, 8192),
    "issue14": (256, 8, 4, 256, 8, 8192),
    "tierA": (512, 8, 8, 1024, 8, 50257),
    "tierB": (768, 12, 12, 1024, 8, 50257),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12, "3090": 71e12}
PHASES = {"hatchling": {}, "hatchling-B": {"pm_enabled": True},
          "hatchling-C": {"pm_enabled": True, "em_enabled": True}}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def shipped_floors() -> dict:
    """alpha_spike_floor / beta_spike_floor as the shipped general preset sets them."""
    model = json.loads((ROOT / "configs" / "00_best_general.json").read_text()).get("model", {})
    return {k: model[k] for k in ("alpha_spike_floor", "beta_spike_floor") if k in model}


def build(name: str, d: int, layers: int, heads: int, seq: int, vocab: int, extra: dict):
    """(model, step_loss(x, y) -> loss) for model `name`."""
    import torch

    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=layers, n_head=heads,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)

        def step_loss(x, y):
            logits = model(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        return model, model, step_loss
    if name == "baby-hatchling":
        return build_peer(d, layers, heads, seq, vocab)
    from model import ModelConfig, build_model, detach_state
    from model.ops.boundary import compile_model

    if name == "hatchling-baseline":  # the same hatchling built by another checkout's model package
        base = baseline_package()
        ModelConfig, build_model, detach_state = base.ModelConfig, base.build_model, base.detach_state
        name = "hatchling"

    # default: a window of one sequence and the spike floors of the shipped presets
    hatch = ModelConfig(arch="hatchling", d_model=d, n_layers=layers, n_heads=heads,
                        **{"wm_window": seq, **shipped_floors(), **extra})
    if name == "transformer":
        cfg = ModelConfig(**{**hatch.__dict__, "arch": "transformer"})
    elif name == "transformer-matched":
        from quality import matched_transformer

        cfg = matched_transformer(hatch, vocab)
    else:
        cfg = ModelConfig(**{**hatch.__dict__, **PHASES[name]})
    model = build_model(cfg, vocab)
    state = {"s": None}
    fwd = model

    def step_loss(x, y):
        out = fwd(x, state=state["s"])
        if model.carries_state:
            state["s"] = detach_state(out.state)
        return torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())

    def compiled():
        nonlocal fwd
        fwd = compile_model(model)

    step_loss.compile = compiled
    return model, model, step_loss


PEER = {"path": ""}  # --peer: a checkout of DominiqueAndrew/baby-hatchling, imported from there, never copied
BASELINE = {"path": ""}  # --baseline: another checkout of this project (e.g. `git worktree add ../before <commit>`)


def baseline_package():
    """The `model` package of the --baseline checkout, imported as `model_baseline` (a copy
    in a temporary folder: its imports inside the package are relative), so that the
    hatchling of that commit trains in this process next to this one's."""
    import importlib
    import shutil
    import tempfile

    if "model_baseline" in sys.modules:
        return sys.modules["model_baseline"]
    src = Path(BASELINE["path"]) / "model"
    if not (src / "__init__.py").is_file():
        sys.exit("hatchling-baseline needs --baseline DIR, another checkout of this project")
    tmp = Path(tempfile.mkdtemp(prefix="bench_baseline_"))
    shutil.copytree(src, tmp / "model_baseline")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("model_baseline")


def build_peer(d: int, layers: int, heads: int, seq: int, vocab: int):
    """seed 002's public Spike-KDA model (baby-hatchling) at our dimensions: every 4th layer
    its NoPE attention, the rest its Spike-KDA blocks in its default mode, "sequential" (its
    fastest form on CPU), FFN 4 d, no episodic store (a SQLite file) and no
    predictive-coding head, so that the step is the language model's alone; state carried
    and detached between steps as ours."""
    import torch

    if not PEER["path"] or not (Path(PEER["path"]) / "src" / "model.py").is_file():
        sys.exit("baby-hatchling needs --peer DIR, a checkout of github.com/DominiqueAndrew/baby-hatchling")
    sys.path.insert(0, PEER["path"])
    from src.model import BabyHatchlingModel, ModelConfig as PeerConfig

    cfg = PeerConfig(name="peer", d_model=d, n_layers=layers, n_heads=heads, dk=d // heads, dv=d // heads, d_ff=4 * d,
                     rank_gate=64, group_kv=1, gw_tokens=1, max_seq=seq, vocab_size=vocab, use_predictive_head=False,
                     use_episodic_memory=False, use_curiosity_bonus=False, kda_mode="sequential")
    model = BabyHatchlingModel(cfg)
    state = {"s": None}

    def step_loss(x, y):
        out, states = model(x, state["s"], use_memory=False)
        state["s"] = [type(st)(*(t.detach() for t in vars(st).values())) for st in states]
        return torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())

    return model, model, step_loss


class Runner:
    """One model with its optimizer and a fixed batch; `steps(n)` runs n optimizer steps."""

    def __init__(self, name, dims, dev, extra, compile_model):
        import torch

        from model import count_params

        d, layers, heads, seq, batch, vocab = dims
        self.name, self.seq, self.batch, self.dev = name, seq, batch, dev
        torch.manual_seed(0)
        eager = name.endswith("-eager")  # the same model never compiled: compiled vs eager in one process
        self.model, _, self.step_loss = build(name.removesuffix("-eager"), d, layers, heads, seq, vocab, extra)
        self.model.to(dev).train()
        if compile_model and not eager:
            if hasattr(self.step_loss, "compile"):
                self.step_loss.compile()
            else:
                from model.ops.boundary import compile_model as compiled

                self.model = compiled(self.model)
        self.params = count_params(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=dev.type == "cuda")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, vocab, (4, batch, seq + 1), generator=g).to(dev)
        self.i = 0
        self.peak_mb = 0.0

    def steps(self, n: int) -> float:
        import torch

        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(n):
            x = self.data[self.i % len(self.data)]
            self.i += 1
            with self.autocast:
                loss = self.step_loss(x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated() / 2**20)
        return time.perf_counter() - t0


def run_interleaved(names, dims, dev, args, extra) -> list[dict]:
    import torch

    d, layers, heads, seq, batch, vocab = dims
    runners = []
    for name in names:
        try:
            runners.append(Runner(name, dims, dev, extra, args.compile))
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            print(json.dumps({"bench": "train_throughput", "model": name, "error": f"{type(exc).__name__}: {exc}"}))
    live = []
    for r in runners:
        try:
            r.steps(args.warmup)
            live.append(r)
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(json.dumps({"bench": "train_throughput", "model": r.name, "error": f"{type(exc).__name__}: {msg}"}))
    times = {r.name: [] for r in live}
    for _ in range(args.rounds):
        for r in live:
            times[r.name].append(r.steps(args.steps) / args.steps)
    rows = {}
    for r in live:
        sec = statistics.median(times[r.name])
        tps = batch * seq / sec
        label = r.name if r.name in ("gpt2", "baby-hatchling") else f"ours-{r.name}"
        row = {"bench": "train_throughput", "model": label, "device": torch.cuda.get_device_name() if dev.type == "cuda"
               else f"cpu x{torch.get_num_threads()} threads", "params": r.params, "d_model": d, "n_layers": layers,
               "n_heads": heads, "seq_length": seq, "batch": batch, "vocab": vocab, "compile": bool(args.compile),
               "tokens_per_s": round(tps, 1), "step_ms": round(1000 * sec, 2),
               "rounds_ms": [round(1000 * t, 1) for t in times[r.name]]}
        if dev.type == "cuda":
            row["peak_mem_mb"] = round(r.peak_mb, 1)
            peak = peak_flops(row["device"])
            flops_per_token = 6 * r.params + 6 * layers * d * seq
            row["mfu"] = round(flops_per_token * tps / peak, 4) if peak else None
        rows[r.name] = row
    for name, row in rows.items():
        for ref, key in (("transformer", "ratio_vs_transformer"), ("transformer-matched", "ratio_vs_matched_transformer"),
                         ("gpt2", "ratio_vs_gpt2"), ("hatchling", "ratio_vs_phase_a"),
                         ("hatchling-baseline", "ratio_vs_baseline")):
            if ref in rows and name != ref and (key != "ratio_vs_phase_a" or name in PHASES) and \
                    (key != "ratio_vs_baseline" or name == "hatchling"):
                row[key] = round(row["tokens_per_s"] / rows[ref]["tokens_per_s"], 3)
        if f"{name}-eager" in rows:  # --compile: this model compiled against itself eager
            row["ratio_vs_eager"] = round(row["tokens_per_s"] / rows[f"{name}-eager"]["tokens_per_s"], 3)
        print(json.dumps(row), flush=True)
    return list(rows.values())


def profile(name, dims, dev, args, extra, top: int) -> None:
    """torch.profiler over `--steps` optimizer steps of one model: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    r = Runner(name, dims, dev, extra, args.compile)
    r.steps(max(1, args.warmup))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        r.steps(args.steps)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"# profile of {name}: {args.steps} step(s), self CPU time total {total / 1e3:.1f} ms")
    print(f"{'op':40s} {'share':>7s} {'self ms':>9s} {'calls':>7s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"{e.key[:40]:40s} {100 * e.self_cpu_time_total / total:6.1f}% {e.self_cpu_time_total / 1e3:9.1f} "
              f"{e.count:7d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="issue14", help=f"one of {','.join(SIZES)}")
    ap.add_argument("--preset", help="measure this preset's model dimensions instead of --size")
    ap.add_argument("--models", default="gpt2,transformer,hatchling,hatchling-B,hatchling-C",
                    help="comma list of gpt2, transformer, transformer-matched, " + ", ".join(PHASES))
    ap.add_argument("--seq-lengths", default="", help="comma list of T, e.g. 256,1024,4096 (default: the size's)")
    ap.add_argument("--tokens-per-step", type=int, default=0,
                    help="with --seq-lengths: batch = this / T (default: the size's batch x seq)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--wm-window", type=int, default=0,
                    help="hatchling's working-memory window (default: one sequence; fix it, e.g. 1024, to see "
                         "the linear-time scaling over --seq-lengths)")
    ap.add_argument("--peer", default="", help="a checkout of DominiqueAndrew/baby-hatchling: adds model baby-hatchling")
    ap.add_argument("--baseline", default="", help="another checkout of this project: model hatchling-baseline is its "
                                                   "hatchling (before/after a change, in one process)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (as train.compile)")
    ap.add_argument("--profile", metavar="MODEL", help="print a torch.profiler top-ops table for MODEL and exit")
    ap.add_argument("--top", type=int, default=15, help="rows of the --profile table")
    args = ap.parse_args()
    PEER["path"], BASELINE["path"] = args.peer, args.baseline

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    extra = {}
    if args.preset:
        from presets import load_preset
        from train.memory_check import vocab_size_guess

        p, _ = load_preset(args.preset)
        m = p.model
        dims = (m.d_model, m.n_layers, m.n_heads, p.train.seq_length, p.train.batch_size,
                vocab_size_guess(p.tokenizer))
        extra = {k: getattr(m, k) for k in ("global_every", "wm_window", "chunk_size", "n_kv_heads", "alpha_spike_floor",
                                             "beta_spike_floor")}
    else:
        dims = SIZES[args.size]
    d, layers, heads, seq, batch, vocab = dims
    if args.wm_window:
        extra["wm_window"] = args.wm_window
    if args.profile:
        profile(args.profile, dims, dev, args, extra, args.top)
        return
    names = args.models.split(",")
    seqs = [int(s) for s in args.seq_lengths.split(",")] if args.seq_lengths else [seq]
    tokens = args.tokens_per_step or batch * seq
    for T in seqs:
        B = batch if T == seq and not args.tokens_per_step else max(1, tokens // T)
        run_interleaved(names, (d, layers, heads, T, B, vocab), dev, args, extra)


if __name__ == "__main__":
    main()
