"""Sampling: nucleus (top-p) with n-gram repetition blocking, through the model's own
incremental state (a KV cache for attention, the recurrent state for KDA layers), so
each new token costs one single-token forward."""
from __future__ import annotations

from collections.abc import Iterator

import torch


def banned_by_ngram(history: list[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram already in `history`."""
    if n <= 0 or len(history) < n:
        return set()
    prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    banned = set()
    for i in range(len(history) - n + 1):
        if tuple(history[i:i + n - 1]) == prefix:
            banned.add(history[i + n - 1])
    return banned


def sample_top_p(logits: torch.Tensor, top_p: float, temperature: float, generator=None) -> int:
    """One token id from logits [V] by nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[choice])


def stream_tokens(model, prompt: list[int], max_new_tokens: int = 64, top_p: float = 0.9, temperature: float = 0.8,
                  no_repeat_ngram: int = 3, stop_token: int | None = None, generator: torch.Generator | None = None,
                  state=None) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled continuations of `prompt` one at a time, O(1)
    per token through the model's state (a fresh generation state unless one is given).
    The caller puts the model in eval mode and under no_grad."""
    device = next(model.parameters()).device
    state = state if state is not None else model.generation_state(1, device)
    history = list(prompt)
    out = model(torch.tensor([prompt], device=device), state=state)
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float().cpu()
        for tok in banned_by_ngram(history, no_repeat_ngram):
            logits[tok] = float("-inf")
        tok = sample_top_p(logits, top_p, temperature, generator)
        if stop_token is not None and tok == stop_token:
            return
        history.append(tok)
        yield tok
        out = model(torch.tensor([[tok]], device=device), state=out.state)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int = 64, top_p: float = 0.9,
             temperature: float = 0.8, no_repeat_ngram: int = 3, stop_token: int | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens` sampled tokens."""
    was_training = model.training
    model.eval()
    new = list(stream_tokens(model, prompt, max_new_tokens, top_p, temperature, no_repeat_ngram, stop_token,
                             generator))
    model.train(was_training)
    return new
