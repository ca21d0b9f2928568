"""Talk to a finished model: a prompt loop whose replies stream token by token.

Each reply continues the prompt's text (this is a plain language model, not a chat-tuned
one), sampled with the preset's `generate` section (nucleus sampling with n-gram blocking,
the primitives of model/generate.py) through the model's own incremental state, so every
new token is one single-token forward. Ctrl-C stops a reply; an empty line or Ctrl-D at
the prompt returns to the first question."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from rich.console import Console

from model.generate import stream_tokens


@torch.no_grad()
def stream_text(fin, prompt: str, generator=None) -> Iterator[str]:
    """Yield pieces of decoded text as the reply grows (a piece that would end in half a
    UTF-8 character waits for the next token)."""
    g, tok = fin.preset.generate, fin.tokenizer
    ids = tok.encode(prompt) or [tok.eot_id]
    state = None
    memory = fin.checkpoint.get("memory")
    if memory and getattr(fin.model, "lifelong", False):  # lifelong: talk with what the run remembered
        state = fin.model.state_from_memory(memory, 1, fin.device)
    new: list[int] = []
    shown = ""
    for t in stream_tokens(fin.model, ids, g.max_tokens, g.top_p, g.temperature, g.no_repeat_ngram, tok.eot_id,
                           generator, state):
        new.append(t)
        text = tok.decode(new)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            yield text[len(shown):]
        shown = text


def talk(fin, console: Optional[Console] = None, read=input, seed: Optional[int] = None) -> int:
    """The prompt loop. Returns the number of replies given."""
    console = console or Console()
    g = fin.preset.generate
    console.print(f"Talking to {fin.path.name} ({fin.preset.name}, {fin.preset.model.arch}). Each reply continues "
                  f"your text: temperature {g.temperature}, top-p {g.top_p}, up to {g.max_tokens} tokens.\n"
                  "Ctrl-C stops a reply; an empty line or Ctrl-D goes back.", markup=False, highlight=False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    replies = 0
    while True:
        try:
            prompt = read("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return replies
        if not prompt.strip():
            return replies
        console.file.write("model> " + prompt)
        console.file.flush()
        try:
            for piece in stream_text(fin, prompt, generator):
                console.file.write(piece)
                console.file.flush()
            console.file.write("\n")
        except KeyboardInterrupt:
            console.file.write(" [stopped]\n")
        console.file.flush()
        replies += 1
