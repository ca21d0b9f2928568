"""Our language model as an EleutherAI lm-eval model (`lm_eval.api.model.LM`).

Scoring (`loglikelihood`, `loglikelihood_rolling`) runs batched: requests sorted by length,
right-padded (every arch is causal, so padding after a sequence cannot change it), one
forward per batch, on the model's device. Contexts longer than the training sequence
length are cut from the left, as the model never saw longer windows; rolling scoring
(wikitext) uses lm-eval's disjoint rolling windows of that length. `generate_until` is
greedy, one request at a time, through the model's incremental state."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


class TrainerLM(LM):
    def __init__(self, model, tokenizer, device, batch_size: int = 16, max_length: int = 256,
                 progress: Optional[Callable[[str, int], Callable[[int], None]]] = None):
        super().__init__()
        self.model, self.tokenizer, self._device = model, tokenizer, torch.device(device)
        self.batch_size, self.max_length = batch_size, max_length
        self.progress = progress  # progress(label, total) -> advance(n)
        self.model.eval()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _advance(self, label: str, total: int):
        return self.progress(label, total) if self.progress is not None else (lambda n: None)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, split where the joint tokenisation splits
        (trailing spaces of the context move to the continuation, as lm-eval does)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        bos = [self.eot_token_id]  # a document starts after an end-of-text in training: it is our BOS
        if not context:
            return bos, self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[:len(ctx)] != ctx or len(ctx) >= len(whole):  # tokenisation merged across the split
            return bos + ctx, self.tok_encode(continuation)
        return bos + ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], advance) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per pair."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                cont = cont[-self.max_length:]
                full = (ctx + cont)[-(self.max_length + 1):]
                rows.append(full[:-1])
                conts.append(cont)
            width = max(len(r) for r in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                x[j, :len(r)] = torch.tensor(r)
            logp = F.log_softmax(self.model(x.to(self._device)).logits.float(), dim=-1).cpu()
            for j, i in enumerate(idx):
                n, c = len(rows[j]), len(conts[j])
                lp = logp[j, n - c:n]
                target = torch.tensor(conts[j])
                results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
            advance(len(idx))
        return results  # type: ignore[return-value]

    # -- the lm-eval interface -----------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        return self._score(pairs, self._advance("loglikelihood", len(pairs)))

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owner = [], []
        for k, r in enumerate(requests):
            tokens = self.tok_encode(r.args[0])
            for w in get_rolling_token_windows(token_list=tokens, prefix_token=self.eot_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append((list(ctx), list(cont)))
                owner.append(k)
        scores = self._score(windows, self._advance("loglikelihood (rolling)", len(windows)))
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        return totals

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        from model.generate import stream_tokens

        advance = self._advance("generate", len(requests))
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = ([self.eot_token_id] + self.tok_encode(context))[-self.max_length:]
            new, text = [], ""
            for t in stream_tokens(self.model, ids, int(kwargs.get("max_gen_toks", 128)), top_p=1.0,
                                   temperature=0.0, no_repeat_ngram=0, stop_token=self.eot_token_id):
                new.append(t)
                text = self.tokenizer.decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
            advance(1)
        return out


def run_tasks(lm: TrainerLM, tasks: list[str], num_fewshot: int = 0, limit: Optional[int] = None,
              include_path: Optional[str] = None, log=print) -> dict:
    """Run each lm-eval task on its own, so one that cannot load (offline, unknown name)
    is reported in one line and the others still run.
    Returns {task: {"metrics": {metric: value}, ...} or {"error": reason}}."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' own bars; ours is the rich one
    for name in ("lm-eval", "lm_eval", "datasets", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(manager.all_tasks)
    out: dict = {}
    for task in tasks:
        if task not in known:
            out[task] = {"error": "unknown lm-eval task (check eval.tasks, or eval.include_path for your own)"}
            log(f"[eval] {task}: skipped: {out[task]['error']}")
            continue
        try:
            res = simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=100, verbosity="ERROR")
        except Exception as e:  # noqa: BLE001 - the dataset could not be fetched, or the task is broken
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
            out[task] = {"error": f"{e.__class__.__name__}: {reason}"}
            log(f"[eval] {task}: skipped: {out[task]['error']}")
            continue
        results = (res or {}).get("results", {})
        for name, values in results.items():
            metrics = {k.split(",")[0]: v for k, v in values.items()  # "acc,none": the metric under no filter
                       if "," in k and isinstance(v, (int, float)) and not k.split(",")[0].endswith("_stderr")}
            stderr = {k.split(",")[0].removesuffix("_stderr"): v for k, v in values.items()
                      if k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
            out[name] = {"metrics": metrics, "stderr": stderr,
                         "samples": (res.get("n-samples", {}).get(name) or {}).get("effective")}
    return out
