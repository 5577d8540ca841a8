"""launch/batch_study.py: runs of several batch sizes compared at equal images seen."""

from __future__ import annotations

import json

from PIL import Image

from lcm_dist.data.demo import demo_photos
from tests.helpers import run_script


def test_batch_study_compares_runs_at_equal_images_seen(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, array in demo_photos()[:3]:
        Image.fromarray(array).save(photos / f"{name}.png")
    args = ["--out", str(tmp_path / "study"), "--images", "16", "--seen", "32"]
    args += ["--inner-steps", "1", "--batches", "4", "8", "--lrs", "0.5", "--json"]
    proc = run_script("launch/batch_study.py", str(photos), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seen"] == 32
    runs = {(r["batch"], r["lr"]): r for r in result["runs"]}
    assert set(runs) == {(4, 0.5), (8, 0.5)}
    assert runs[(4, 0.5)]["steps"] == 8 and runs[(8, 0.5)]["steps"] == 4
    for run in runs.values():
        quarters = run["loss_by_quarter_seen"]
        assert len(quarters) == 4 and all(q is not None and q > 0 for q in quarters)
