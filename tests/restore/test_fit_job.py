"""launch/fit.py: fitting many images in committed units, resumable, the same on any number of
processes; and its one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_dist.data.shards import load_keys
from lcm_dist.restore.job import share, units
from tests.helpers import REPO, subprocess_env, torchrun

FIT = ["--iterations", "3", "--batch-size", "16", "--quiet"]


def _latents(out):
    import zarr

    group = zarr.open_group(str(out / "latents.zarr"), mode="r")
    return group, np.asarray(group["latents"][:])


def test_every_unit_goes_to_exactly_one_process():
    for n_units in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            taken = [u for r in range(world) for u in share(n_units, r, world)]
            assert sorted(taken) == list(range(n_units))
    assert units(35, 16) == [(0, 16), (16, 32), (32, 35)]


def test_embedding_a_shard_set_writes_every_row_and_a_rerun_fits_nothing(
    cli, tmp_path, trained_export, demo64_shards
):
    out = tmp_path / "emb"
    args = ["--model", trained_export, "--task", "embed", demo64_shards, "--out", out, *FIT]
    proc = cli("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fitted all 64 image(s)" in proc.stdout
    group, phi = _latents(out)
    assert phi.shape == (64, group.attrs["phi_size"]) and np.isfinite(phi).all()
    assert list(group["keys"][:]) == load_keys(demo64_shards)
    assert group.attrs["complete"] is True
    psnr = np.asarray(group["psnr"][:])
    assert np.isfinite(psnr).all() and (psnr > 5).all()
    assert f"against their inputs: {psnr.mean():.2f} dB" in proc.stdout
    assert len(list((out / "images").glob("*.png"))) == 64
    assert (out / "images" / "0000000063.png").is_file()
    assert len(list((out / "done").glob("unit-*.json"))) == 4
    # The same command again finds everything committed and fits nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "done").iterdir()}
    proc = cli("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fitted 0 image(s)" in proc.stderr and "4 of 4 unit(s) were already" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "done").iterdir()} == before


def test_results_do_not_depend_on_processes_or_a_stop(tmp_path, trained_export, demo64_shards):
    """One process, two processes' shares, and a fit stopped after one unit and resumed: the
    same latents, bit for bit."""
    from lcm_dist.restore.inputs import open_inputs
    from lcm_dist.restore.job import FitSettings, run_fit
    from lcm_dist.restore.model import load_model
    from lcm_dist.restore.output import FitOutput

    torch.use_deterministic_algorithms(True)
    try:
        model = load_model(str(trained_export), device="cpu")
        settings = FitSettings("inpaint", False, 3, "sgd", 0.5, batch_size=16, random_boxes=2)
        inputs = open_inputs([str(demo64_shards)])
        p = model.attrs["phi_size"]

        def output(name):
            out = FitOutput(str(tmp_path / name))
            out.create_or_check({"format": "lcm-dist-fit", "x": 1}, inputs.keys, p, 16)
            return out

        one = output("one")
        assert run_fit(model, inputs, one, settings, progress=False)["fitted_images"] == 64
        two = output("two")
        for rank in (1, 0):
            run_fit(model, inputs, two, settings, rank=rank, world=2, progress=False)
        stopped = output("stopped")
        asked = iter([False, True])
        result = run_fit(
            model, inputs, stopped, settings, progress=False, should_stop=lambda: next(asked)
        )
        assert result["stopped"] and result["fitted_images"] == 16
        assert np.isnan(_latents(tmp_path / "stopped")[1][16:]).all()
        result = run_fit(model, inputs, stopped, settings, progress=False)
        assert result["fitted_images"] == 48 and result["skipped_units"] == 1
    finally:
        torch.use_deterministic_algorithms(False)
    reference = _latents(tmp_path / "one")[1]
    assert np.isfinite(reference).all()
    for name in ("two", "stopped"):
        np.testing.assert_array_equal(_latents(tmp_path / name)[1], reference)
        for i in (0, 40, 63):
            a = (tmp_path / "one" / "images" / f"{i:010d}.png").read_bytes()
            assert (tmp_path / name / "images" / f"{i:010d}.png").read_bytes() == a


def test_fit_errors_are_one_line_naming_the_problem(cli, tmp_path, trained_export, demo64_shards):
    out = tmp_path / "out"
    base = ["--model", trained_export, "--out", out, *FIT]
    proc = cli("fit", *base, "--task", "embed", demo64_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The output belongs to that fit: another task or setting is refused, nothing rewritten.
    proc = cli("fit", *base, "--task", "superres", demo64_shards)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out} belongs to another fit (settings.task is 'embed' ")
    assert "choose another --out" in last
    proc = cli("fit", *base, "--task", "embed", "--refine", "5", demo64_shards)
    assert proc.returncode == 2 and "--refine fine-tunes a generator per image" in proc.stderr
    # Images of another size than the model's.
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (32, 32)).save(small / "a.png")
    proc = cli("fit", "--model", trained_export, "--task", "embed", small, "--out", tmp_path / "o2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: image {small / 'a.png'} is 32x32, expected 64x64"
    )
    # Per-image masks: one missing.
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (90, 120, 30)).save(images / f"{name}.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    hole = np.zeros((64, 64), np.uint8)
    hole[20:40, 20:40] = 255
    Image.fromarray(hole).save(masks / "a.png")
    args = ["--model", trained_export, "--task", "inpaint", "--masks", masks, images]
    proc = cli("fit", *args, "--out", tmp_path / "o3", *FIT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: no mask for input 'b': {masks / 'b.png'} does not exist"
    )
    Image.fromarray(hole).save(masks / "b.png")
    proc = cli("fit", *args, "--out", tmp_path / "o3", *FIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restored = np.asarray(Image.open(tmp_path / "o3" / "images" / "b.png"))
    assert (restored[0, 0] == (90, 120, 30)).all()  # the known pixels are kept


@pytest.mark.slow
@pytest.mark.dist
def test_a_fit_killed_on_two_processes_resumes_and_fits_each_image_once(
    tmp_path, trained_export, demo64_shards
):
    """Two processes under torchrun, SIGKILLed (the whole job) once units have committed, then
    re-run: every unit is committed once, the committed ones are not fitted again, and the
    latents equal those of an uninterrupted fit bit for bit."""
    import subprocess

    def command(out):
        return torchrun(2) + ["launch/fit.py", "--model", str(trained_export)] + [
            "--task", "superres", str(demo64_shards), "--out", str(out),
            "--iterations", "30", "--batch-size", "4", "--quiet",
        ]  # fmt: skip

    env = subprocess_env()
    reference = tmp_path / "reference"
    proc = subprocess.run(command(reference), cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    job = subprocess.Popen(
        command(killed), cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((killed / "done").glob("unit-*.json"))) < 4:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    committed = {p.name: p.read_bytes() for p in (killed / "done").glob("unit-*.json")}
    assert 4 <= len(committed) < 16, "the fit was not killed mid-way"
    proc = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fitted = sum(int(n) for n in re.findall(r"fitted (\d+) image", proc.stderr))
    assert fitted == 64 - 4 * len(committed), proc.stderr  # only what was not committed
    markers = {p.name: p.read_bytes() for p in (killed / "done").glob("unit-*.json")}
    assert len(markers) == 16
    assert all(markers[name] == data for name, data in committed.items())
    assert [json.loads(m)["rows"] for _, m in sorted(markers.items())] == [
        [lo, lo + 4] for lo in range(0, 64, 4)
    ]
    np.testing.assert_array_equal(_latents(killed)[1], _latents(reference)[1])


def test_a_full_disk_stops_the_fit_in_one_line_and_keeps_what_was_committed(
    cli, tmp_path, trained_export, demo64_shards
):
    out = tmp_path / "out"
    args = ["--model", trained_export, "--task", "colorize", demo64_shards, "--out", out, *FIT]
    proc = cli("fit", *args, env={"LCM_DIST_FAIL_AT": "fit.write_unit:2"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: cannot write the fit's output (fit.write_unit): no space left on device"
    )
    assert [p.name for p in (out / "done").iterdir()] == ["unit-00000000.json"]
    first = _latents(out)[1][:16].copy()
    proc = cli("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fitted 48 image(s)" in proc.stderr
    np.testing.assert_array_equal(_latents(out)[1][:16], first)


def test_restored_images_as_a_shard_set(cli, tmp_path, trained_export, demo64_shards):
    from lcm_dist.data.shards import load_manifest, verify_shards
    from lcm_dist.restore.inputs import open_inputs

    out = tmp_path / "out"
    args = ["--model", trained_export, "--task", "inpaint", demo64_shards, "--out", out]
    proc = cli("fit", *args, "--images", "shards", "--iterations", "2", "--batch-size", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    verify_shards(out / "images")  # sizes and SHA-256 as the manifest says
    manifest = load_manifest(out / "images")
    assert [(e["first_row"], e["count"]) for e in manifest["shards"]] == [
        (0, 24),
        (24, 24),
        (48, 16),
    ]
    assert load_keys(out / "images") == load_keys(demo64_shards)
    restored = open_inputs([str(out / "images")]).read(40, 42)
    known = open_inputs([str(demo64_shards)]).read(40, 42)
    assert restored.shape == (2, 3, 64, 64)
    assert torch.equal(restored[..., :8, :], known[..., :8, :])  # observed pixels kept
