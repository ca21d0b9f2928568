"""Held-out evaluation (cross-entropy, perplexity) and generated samples; `Evaluation` is
the run's component that does both at its evaluation points."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data.streams import reset_mask
from model import detach_state, generate


@torch.no_grad()
def evaluate(model, windows: list[torch.Tensor], eot_id: int, device, autocast=nullcontext) -> dict:
    """Mean next-token cross-entropy over the held-out windows (each [B, T+1]).
    Consecutive windows continue the same streams, so recurrent state carries."""
    if not windows:
        return {}
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    first = torch.ones(windows[0].shape[0], dtype=torch.bool)
    for w in windows:
        w = w.to(device)
        x, y = w[:, :-1], w[:, 1:]
        with autocast():
            out = model(x, state=state if model.carries_state else None, reset_mask=reset_mask(x, eot_id, first.to(device)))
        total += F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
        state = detach_state(out.state) if model.carries_state else None
        first = x[:, -1] == eot_id
    model.train(was_training)
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def generate_samples(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt text, continuation text) for each prompt, by nucleus sampling."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for p in prompts:
        new = generate(model, p, max_new_tokens=max_new_tokens, top_p=0.9, temperature=0.8,
                       no_repeat_ngram=3, stop_token=tokenizer.eot_id, generator=gen)
        out.append((tokenizer.decode(p), tokenizer.decode(new)))
    return out


class Evaluation:
    """The run's held-out windows and sample prompts (rank 0 holds them; the others
    evaluate nothing): `run` evaluates, writes an `eval` row and shows samples."""

    def __init__(self, windows: list, prompts: list, tokenizer, sample_tokens: int, device, autocast, ddp, metrics,
                 reporter):
        self.windows, self.prompts, self.tokenizer, self.sample_tokens = windows, prompts, tokenizer, sample_tokens
        self.device, self.autocast, self.ddp, self.metrics, self.reporter = device, autocast, ddp, metrics, reporter

    def run(self, model, counters, samples: bool) -> dict:
        from .distributed import barrier
        from .progress import human

        row: dict = {}
        if self.ddp.is_main and self.windows:
            row = evaluate(model, self.windows, self.tokenizer.eot_id, self.device, self.autocast)
            self.metrics.write({"kind": "eval", "step": counters.step, "tokens": counters.tokens, **row})
            self.reporter.log(f"[eval] {human(counters.tokens)} tokens: held-out loss {row['eval_loss']:.3f}, "
                              f"perplexity {row['eval_ppl']:.1f}")
            if samples and self.prompts:
                for prompt, text in generate_samples(model, self.tokenizer, self.prompts, self.sample_tokens,
                                                     seed=counters.step):
                    self.reporter.log(f"  [sample] {prompt!r} -> {text!r}", style="dim")
        barrier(self.ddp)
        return row
