"""Fault points: which hit of which point, on which process, acts."""

from __future__ import annotations

import pytest

from lcm_dist import faults


@pytest.mark.parametrize(
    "spec, rank, fires_at",
    [
        ("p", "0", 1),
        ("p:3", "0", 3),
        ("p:2@1", "1", 2),
        ("p:2@1", "0", None),
        ("p@1", "1", 1),
        ("p@1", "0", None),
        ("q:1", "0", None),
    ],
)
def test_a_fault_point_fires_on_its_hit_and_its_process(monkeypatch, spec, rank, fires_at):
    monkeypatch.setattr(faults, "_hits", faults.Counter())
    monkeypatch.setenv("LCM_DIST_FAIL_AT", spec)
    monkeypatch.setenv("RANK", rank)
    fired = []
    for hit in range(1, 5):
        try:
            faults.fail_point("p")
        except OSError as err:
            assert "No space left on device" in str(err)
            fired.append(hit)
    assert fired == ([] if fires_at is None else [fires_at])
