"""Adaptive reweighting: weights move toward the sources with higher loss, smoothly,
stay within [min_weight, max_weight], and round-trip through state_dict; fed to a mixer
they shift the mix toward the hard source."""
from collections import Counter

import pytest

from data import AdaptiveReweighter, DataConfig, DocumentMixer

from .conftest import ListSource


def test_weights_move_toward_the_high_loss_source_smoothly():
    rw = AdaptiveReweighter(2, min_weight=0.1, max_weight=10.0, smoothing=0.5)
    history = [rw.update([2.0, 4.0]) for _ in range(12)]
    easy, hard = zip(*history)
    assert history[0] == pytest.approx([0.5 * 1 + 0.5 * (2 / 3), 0.5 * 1 + 0.5 * (4 / 3)])
    assert all(a > b for a, b in zip(easy, easy[1:])) and all(a < b for a, b in zip(hard, hard[1:]))
    assert history[-1] == pytest.approx([2 / 3, 4 / 3], abs=1e-3)  # the relative losses


def test_weights_stay_within_the_bounds():
    rw = AdaptiveReweighter(3, min_weight=0.5, max_weight=2.0, smoothing=0.0)
    for losses in ([0.01, 1.0, 50.0], [9.0, 0.1, 0.1], [3.0, 3.0, 3.0]):
        w = rw.update(losses)
        assert all(0.5 <= x <= 2.0 for x in w)
    assert rw.update([0.01, 1.0, 50.0]) == [0.5, 0.5, 2.0]


def test_sources_without_loss_keep_their_weight_and_bad_values_are_ignored():
    rw = AdaptiveReweighter(3, smoothing=0.0, initial=[1.0, 2.0, 1.0])
    w = rw.update([3.0, None, float("nan")])
    assert w[1] == 2.0 and w[2] == 1.0 and w[0] == pytest.approx(1.0)
    assert rw.update([None, None, None]) == w


def test_state_round_trips():
    rw = AdaptiveReweighter(2, smoothing=0.8)
    rw.update([1.0, 3.0])
    other = AdaptiveReweighter(2, smoothing=0.8)
    other.load_state_dict(rw.state_dict())
    assert other.update([2.0, 2.5]) == rw.update([2.0, 2.5])
    with pytest.raises(ValueError):
        AdaptiveReweighter(3).load_state_dict(rw.state_dict())


def test_fed_to_a_mixer_the_hard_source_gets_more_turns():
    mixer = DocumentMixer([ListSource("easy", 50), ListSource("hard", 50)],
                          DataConfig(eval_fraction=0.0, min_text_length=1, dedup=False))
    rw = AdaptiveReweighter(2, min_weight=0.2, max_weight=5.0, smoothing=0.0)
    mixer.set_weights(rw.update([1.0, 4.0]))  # targets 0.4 and 1.6
    counts = Counter(i for i, _ in (mixer.next_document() for _ in range(3000)))
    assert counts[1] / 3000 == pytest.approx(0.8, abs=0.03)
