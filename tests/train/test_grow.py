"""train.grow_from: a trained run grown onto shards with new images keeps its generator,
optimizer state and old rows exactly; the new rows start from their fitted phi and train."""

from __future__ import annotations

import json

import numpy as np
from safetensors.torch import load_file

from lcm_dist.data.demo import random_crops
from lcm_dist.data.shards import write_shards
from lcm_dist.latents.store import LatentStore
from lcm_dist.train.checkpoint import find_latest


def _rows(run_dir, url):
    commit = find_latest(run_dir)
    store = LatentStore.open(str(url), mode="r")
    store.restore_slots(commit.slots)
    return commit, store.read_rows(range(store.num_rows))


def _grown_config(tmp_path, trained_run, shards, **train):
    cfg = json.loads((trained_run / "config.json").read_text())
    cfg["run_dir"] = str(tmp_path / "grown")
    cfg["data"] = {**cfg["data"], "shards": str(shards), "batch_size": 24}
    cfg["train"] = {**cfg["train"], "grow_from": str(trained_run), **train}
    cfg["log"] = {**cfg["log"], "image_every_steps": 0}
    path = tmp_path / "grown.json"
    path.write_text(json.dumps(cfg))
    return path


def test_a_grown_run_keeps_the_old_run_and_trains_the_new_rows(
    cli, tmp_path, trained_run, trained_export
):
    new_crops = list(random_crops(8, 64, seed=9))
    grown_shards = tmp_path / "grown-shards"
    write_shards([*random_crops(64, 64, seed=1), *new_crops], grown_shards, 64, 8, progress=False)
    new_shards = tmp_path / "new-shards"
    write_shards(new_crops, new_shards, 64, 8, progress=False)
    fits = tmp_path / "fits"
    args = ["--model", trained_export, "--task", "embed", new_shards, "--out", fits]
    proc = cli("fit", *args, "--iterations", "3", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Grown, not trained yet (max_steps is the old run's step): everything old carries over.
    cfg = _grown_config(tmp_path, trained_run, grown_shards, new_rows_from=str(fits))
    proc = cli("train", "--config", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 16" in proc.stdout
    old_commit, old_rows = _rows(trained_run, trained_run / "latents.zarr")
    commit, rows = _rows(tmp_path / "grown", tmp_path / "grown" / "latents.zarr")
    assert commit.state["step"] == 16 and commit.state["num_images"] == 72
    assert commit.state["grown_from"]["num_images"] == 64
    np.testing.assert_array_equal(rows[:64], old_rows)
    import zarr

    fitted = np.asarray(zarr.open_group(str(fits / "latents.zarr"), mode="r")["latents"][:])
    np.testing.assert_array_equal(rows[64:], fitted)
    for name in old_commit.folder.iterdir():
        if name.name not in ("state.json", "slots.npy"):  # engine, optimizer, weights, RNG
            assert (commit.folder / name.name).read_bytes() == name.read_bytes(), name.name

    # Trained on for one epoch of the grown set (3 batches of 24): the new rows train too.
    proc = cli("train", "--config", cfg, "--set", "train.max_steps=19")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step-00000016" in proc.stdout + proc.stderr
    commit, trained = _rows(tmp_path / "grown", tmp_path / "grown" / "latents.zarr")
    assert commit.state["step"] == 19
    changed = np.abs(trained - rows).max(1) > 0
    assert changed[64:].all() and changed[:64].all()
    before = load_file(str(old_commit.folder / "generator.safetensors"))
    after = load_file(str(commit.folder / "generator.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before)
    # The old run was only read.
    assert find_latest(trained_run).tag == old_commit.tag


def test_growing_needs_the_old_images_first(cli, tmp_path, trained_run):
    shards = tmp_path / "other"
    write_shards(list(random_crops(72, 64, seed=3)), shards, 64, 8, progress=False)
    cfg = _grown_config(tmp_path, trained_run, shards)
    proc = cli("train", "--config", cfg)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: row 0 of {shards} is ")
    assert "the new shards must start with the old images in their order" in last
    assert not (tmp_path / "grown" / "latest.json").exists()


def test_growing_from_a_fit_without_the_new_images_is_refused(
    cli, tmp_path, trained_run, trained_export
):
    grown_shards = tmp_path / "grown-shards"
    new = list(random_crops(8, 64, seed=9))
    write_shards([*random_crops(64, 64, seed=1), *new], grown_shards, 64, 8, progress=False)
    other = tmp_path / "other-shards"
    write_shards(list(random_crops(8, 64, seed=4)), other, 64, 8, progress=False)
    fits = tmp_path / "fits"
    args = ["--model", trained_export, "--task", "embed", other, "--out", fits]
    assert cli("fit", *args, "--iterations", "1", "--quiet").returncode == 0
    cfg = _grown_config(tmp_path, trained_run, grown_shards, new_rows_from=str(fits))
    proc = cli("train", "--config", cfg)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: the fit in {fits} has no phi for the new image {new[0][0]!r} (8 of 8 new "
        "images missing); fit the new shards"
    )
