"""Held-out evaluation (cross-entropy, perplexity) and generated samples; `Evaluation` is
the run's component that does both at its evaluation points."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from data.streams import reset_mask
from model import detach_state, generate


@torch.no_grad()
def evaluate(model, windows: list[torch.Tensor], eot_id: int, device, autocast=nullcontext,
             masks: Optional[dict[str, list[torch.Tensor]]] = None, temperatures: Sequence[float] = ()) -> dict:
    """Mean next-token cross-entropy over the held-out windows (each [B, T+1]).
    Consecutive windows continue the same streams, so recurrent state carries.
    masks: name -> one [B, T] bool per window (which predicted tokens count); each adds
    `<name>_loss` (mean over those tokens, None when there are none) and `<name>_tokens`.
    temperatures: also the loss with the logits divided by each, under `temperature_loss`
    ({T: loss}): how much of a loss is over- or under-confidence rather than ranking."""
    if not windows:
        return {}
    masks = masks or {}
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    part = {name: [0.0, 0] for name in masks}
    tempered = {float(t): 0.0 for t in temperatures}
    first = torch.ones(windows[0].shape[0], dtype=torch.bool)
    for i, w in enumerate(windows):
        w = w.to(device)
        x, y = w[:, :-1], w[:, 1:]
        with autocast():
            out = model(x, state=state if model.carries_state else None, reset_mask=reset_mask(x, eot_id, first.to(device)))
        logits = out.logits.float().flatten(0, 1)
        losses = F.cross_entropy(logits, y.flatten(), reduction="none").view_as(y)
        for t in tempered:
            tempered[t] += F.cross_entropy(logits / t, y.flatten(), reduction="sum").item()
        total += losses.sum().item()
        count += y.numel()
        for name, mask in masks.items():
            m = mask[i].to(device)
            part[name][0] += losses[m].sum().item()
            part[name][1] += int(m.sum())
        state = detach_state(out.state) if model.carries_state else None
        first = x[:, -1] == eot_id
    model.train(was_training)
    loss = total / count
    row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}
    for name, (loss_sum, n) in part.items():
        row[f"{name}_loss"] = loss_sum / n if n else None
        row[f"{name}_tokens"] = n
    if tempered:
        row["temperature_loss"] = {t: v / count for t, v in tempered.items()}
    return row


def beyond_window(windows: list[torch.Tensor], eot_id: int, reach: int) -> list[torch.Tensor]:
    """Which predicted tokens of the held-out windows are re-mentions beyond the window:
    one [B, T] bool per window (window [B, T+1]; target t is w[:, t+1]). A target is one
    when the pair (previous token, target), a piece of a word or of a phrase, occurred
    earlier in the same document, and its latest earlier occurrence lies more than
    `reach` tokens back: the model can predict it from having seen it, but no attention
    window of `reach` tokens shows it (only carried state or a memory can).

    A document ends at end-of-text; a stream's first window starts a document (the model
    saw nothing before it either). Positions count every token of the stream."""
    if not windows:
        return []
    B = windows[0].shape[0]
    last: list[dict] = [{} for _ in range(B)]  # per stream: pair -> its latest position
    pos = [0] * B
    out = []
    for w in windows:
        rows = w.tolist()
        mask = torch.zeros(B, w.shape[1] - 1, dtype=torch.bool)
        for b, row in enumerate(rows):
            seen, p = last[b], pos[b]
            for t in range(len(row) - 1):
                prev, target = row[t], row[t + 1]
                if prev == eot_id:  # target starts a new document
                    seen.clear()
                elif target != eot_id:
                    pair = (prev, target)
                    before = seen.get(pair)
                    mask[b, t] = before is not None and p + 1 - before > reach
                    seen[pair] = p + 1
                p += 1
            pos[b] = p
        out.append(mask)
    return out


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
