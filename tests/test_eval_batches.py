"""Scoring batches: sorted by length, at most batch_size rows, cut where padding would pass the tolerance."""

import random

import pytest

from softprompt.evaluate import length_batches


@pytest.mark.parametrize("tol", [None, 0.0, 0.05, 0.5])
def test_length_batches_cover_every_row_once_in_length_order(tol):
    lengths = [random.Random(0).randint(1, 60) for _ in range(203)]
    batches = length_batches(lengths, 16, tol)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert all(0 < len(b) <= 16 for b in batches)
    if tol is None:
        assert [len(b) for b in batches] == [16] * 12 + [11]
    else:
        for b in batches:
            real = sum(lengths[i] for i in b)
            assert len(b) * max(lengths[i] for i in b) <= (1 + tol) * real + 1e-9


def test_length_batches_equal_lengths_fill_whole_batches():
    assert length_batches([5] * 40, 16, 0.0) == [list(range(16)), list(range(16, 32)), list(range(32, 40))]
