"""The MQAR streams of bench/mqar.py place pairs and queries where they say."""
from __future__ import annotations

import torch

from bench.mqar import PairStreams


def whole_stream(streams: PairStreams, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, L], gaps [B, L]) of consecutive batches: gap[b, i] belongs to token i."""
    xs, ys, gs = zip(*(streams.next_batch() for _ in range(batches)))
    x, y, g = torch.cat(xs, 1), torch.cat(ys, 1), torch.cat(gs, 1)
    tokens = torch.cat([x[:, :1], y], 1)
    gaps = torch.cat([torch.full_like(g[:, :1], -1), g], 1)
    return tokens, gaps


def check(streams: PairStreams, batches: int, lo: int, hi: int) -> int:
    tokens, gaps = whole_stream(streams, batches)
    n_f, n_k = streams.n_filler, streams.n_keys
    answers = 0
    for b in range(tokens.shape[0]):
        row, gap = tokens[b].tolist(), gaps[b].tolist()
        for i, g in enumerate(gap):
            if g < 0:
                continue
            answers += 1
            key, value = row[i - 1], row[i]
            assert n_f <= key < n_f + n_k and value >= n_f + n_k  # a key, then its value
            assert row[i - g] == value and row[i - g - 1] == key  # the pair lies exactly g back
            assert lo <= g <= hi + 2, g  # as drawn (a query waits at most for one before it)
            between = row[i - g: i - 1]
            assert key not in between  # one right answer: the key is nowhere in between
    return answers


def test_pairs_and_queries_lie_where_their_gaps_say():
    streams = PairStreams(B=4, T=64, n_filler=32, n_keys=128, n_values=16, gap=(2, 32), pair_every=12, seed=0,
                          uniform=True)
    assert check(streams, 40, 2, 32) > 300


def test_a_tuple_of_spacings_gives_the_streams_of_a_batch_their_own_pair_density():
    """pair_every=(8, 64): streams 0 and 2 dense, 1 and 3 sparse, pairs still where they say."""
    streams = PairStreams(B=4, T=64, n_filler=32, n_keys=256, n_values=16, gap=(2, 32), pair_every=(8, 64), seed=0,
                          uniform=True, cooldown=64)
    tokens, gaps = whole_stream(streams, 60)
    keys = ((tokens >= 32) & (tokens < 32 + 256)).sum(1).tolist()  # a key per pair and one per query
    assert min(keys[0], keys[2]) > 3 * max(keys[1], keys[3]), keys
    assert check(PairStreams(B=4, T=64, n_filler=32, n_keys=256, n_values=16, gap=(2, 32), pair_every=(8, 64),
                             seed=0, uniform=True, cooldown=64), 60, 2, 32) > 300


def test_long_fixed_gaps_and_text_filler():
    text = list(b"It was the best of times, it was the worst of times. " * 40)
    streams = PairStreams(B=2, T=64, n_filler=256, n_keys=256, n_values=16, gap=(500, 500), pair_every=40, seed=1,
                          text=text)
    assert check(streams, 100, 500, 500) > 100
    tokens, gaps = whole_stream(PairStreams(B=1, T=64, n_filler=256, n_keys=256, n_values=16, gap=(500, 500),
                                            pair_every=40, seed=1, text=text), 10)
    filler = [t for t in tokens[0].tolist() if t < 256]
    assert bytes(filler[:20]).decode() in bytes(text).decode() * 2  # the filler is the text, in order


def test_attention_silenced_zeroes_only_the_wm_attention_and_only_inside():
    """The probe behind backbone/attention_silenced: inside the context the model equals
    one whose WM attention blocks output zeros (their state still advances); outside it
    the model is what it was."""
    from bench.mqar import attention_silenced
    from model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="hatchling", d_model=32, n_layers=2, n_heads=2, global_every=2, wm_window=8, chunk_size=8)
    model = build_model(cfg, 50).eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(x).logits
        with attention_silenced(model):
            silenced = model(x).logits
        after = model(x).logits
        wm = model.blocks[1].mixer
        with torch.no_grad():
            wm.out_proj.weight.zero_()  # the same model by its weights: its attention adds nothing
        zeroed = model(x).logits
    assert not torch.allclose(before, silenced)
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(silenced, zeroed)
