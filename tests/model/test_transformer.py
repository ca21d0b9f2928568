"""The baseline transformer: causal, tied, and its KV-cache decoding matches a full pass."""
import torch

from model import ModelConfig, build_model, count_params, generate
from model.generate import banned_by_ngram


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="transformer", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, **kw), 97)


def test_causal_future_tokens_do_not_change_the_past():
    m = tiny()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 97, (2, 4))
    assert torch.allclose(m(x).logits[:, :8], m(y).logits[:, :8], atol=1e-6)
    assert not torch.allclose(m(x).logits[:, 8:], m(y).logits[:, 8:])


def test_tied_embeddings_counted_once():
    m = tiny()
    assert m.lm_head.weight is m.embed.weight
    assert count_params(m) == sum(p.numel() for p in m.parameters())  # parameters() dedups too


def test_kv_cache_decoding_equals_full_forward():
    m = tiny().eval()
    x = torch.randint(0, 97, (2, 20))
    full = m(x).logits
    state = m.generation_state(2, "cpu")
    parts = [m(x[:, :7], state=state).logits]
    for t in range(7, 20):
        parts.append(m(x[:, t:t + 1], state=state).logits)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_ngram_blocking():
    assert banned_by_ngram([1, 2, 3, 1, 2], 3) == {3}
    assert banned_by_ngram([5, 5], 1) == {5}
    m = tiny()
    out = generate(m, [1, 2, 3], max_new_tokens=40, no_repeat_ngram=2, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    seq = [1, 2, 3] + out
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))
