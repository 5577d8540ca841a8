"""The epoch plan's batch slots: where each loader worker's samples land in the batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lcm_dist.data.plan import batch_sizes, worker_batch_slots


def _round_robin(counts: list[int]) -> list[tuple[int, int]]:
    """(worker, index in its stream) in the order the samples are taken: one from each worker
    in turn, skipping workers that have run out."""
    order, taken = [], [0] * len(counts)
    while any(t < n for t, n in zip(taken, counts, strict=True)):
        for w, n in enumerate(counts):
            if taken[w] < n:
                order.append((w, taken[w]))
                taken[w] += 1
    return order


@pytest.mark.parametrize("counts", [[7], [5, 5], [10, 5, 3], [0, 4], [3, 0, 8, 1]])
@pytest.mark.parametrize("steps", [1, 3, 4])
def test_slots_follow_the_round_robin_order(counts, steps):
    sizes = batch_sizes(sum(counts), steps)
    expected = _round_robin(counts)
    offsets = [0, *itertools.accumulate(sizes)]
    filled = [[None] * size for size in sizes]
    for w in range(len(counts)):
        slots = worker_batch_slots(counts, sizes, w)
        assert len(slots) == steps
        assert sum(s.size for s in slots) == counts[w]
        index = 0
        for k, batch_slots in enumerate(slots):
            for slot in batch_slots.tolist():
                filled[k][slot] = (w, index)
                index += 1
    assert [x for batch in filled for x in batch] == expected
    assert [len(b) for b in filled] == [offsets[k + 1] - offsets[k] for k in range(steps)]


def test_slots_of_a_lone_worker_are_in_order():
    slots = worker_batch_slots([10], [4, 3, 3], 0)
    assert [s.tolist() for s in slots] == [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2]]
    assert all(s.dtype == np.int64 for s in slots)
