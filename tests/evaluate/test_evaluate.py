"""Evaluation: the DIP baseline and launch/evaluate.py's report of LCM against the baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_dist.restore.degrade import Degradation
from tests.helpers import save_images


def test_dip_fits_its_observation():
    from lcm_dist.evaluate.baselines import SkipNet, dip_restore

    net = SkipNet(8, 3, (16, 16, 16))
    assert net(torch.rand(1, 8, 32, 32)).shape == (1, 3, 32, 32)
    torch.manual_seed(0)
    clean = torch.rand(1, 3, 1, 1).expand(1, 3, 32, 32).contiguous()  # a flat colour
    out, _ = dip_restore(clean, Degradation(), 32, iterations=60, channels=(16, 16, 16))
    assert float((out - clean).pow(2).mean()) < 1e-3


def test_dip_read_out_during_a_longer_fit_is_the_shorter_fit():
    from lcm_dist.evaluate.baselines import dip_restore, dip_restore_at
    from lcm_dist.restore.degrade import make_operator

    torch.manual_seed(0)
    clean = torch.rand(2, 3, 32, 32)
    op = make_operator("superres", 32, 2, factor=4)
    y = op(clean)
    fits = dip_restore_at(y, op, 32, [3, 7], channels=(8, 8, 8), seed=5)
    assert sorted(fits) == [3, 7] and fits[7][1] >= fits[3][1] > 0
    for n in (3, 7):
        alone, _ = dip_restore(y, op, 32, iterations=n, channels=(8, 8, 8), seed=5)
        torch.testing.assert_close(fits[n][0], alone, atol=0, rtol=0)


def test_evaluate_cli_writes_report(tmp_path, trained_export, demo_shards, cli):
    torch.manual_seed(0)
    save_images(torch.rand(2, 3, 40, 48), tmp_path / "clean")  # any size: centre-cropped, resized
    proc = cli(
        "evaluate",
        "--model",
        str(trained_export),
        "--task",
        "inpaint",
        "--images",
        str(tmp_path / "clean"),
        "--out",
        str(tmp_path / "ev"),
        "--iterations",
        "4",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert set(report["mean"]) == {"lcm", "dip", "naive"}
    for method in report["mean"].values():
        assert {"psnr", "ssim", "psnr_hole", "ssim_hole"} <= set(method)
        assert all(np.isfinite(list(method.values())))
    assert report["methods"]["lcm"]["iterations"] == report["methods"]["dip"]["iterations"] == 4
    assert (report["settings"]["optimizer"], report["settings"]["lr"]) == ("sgd", 0.5)
    assert report["settings"]["box"] == 0.5 and report["settings"]["factor"] is None
    assert len(report["images"]) == 2 and "lcm" in report["images"][0]
    # Scored with the observed pixels put back (as restore.py writes them): the whole image's
    # error is the hole's, spread over 4 times the pixels (a 32x32 hole in 64x64).
    assert report["settings"]["finish"] == "consistent"
    for image in report["images"]:
        for method in ("lcm", "dip", "naive"):
            m = image[method]
            assert m["psnr"] == pytest.approx(m["psnr_hole"] + 10 * np.log10(4), abs=1e-3)
    grid = Image.open(tmp_path / "ev" / "grid.png")
    # 5 labelled columns, 2 rows, the 64x64 images enlarged 2x, 2 px apart, a 16 px header.
    assert grid.size == (5 * 130 + 2, 2 * 130 + 2 + 16)
    assert list((tmp_path / "ev" / "tb").glob("events.*"))
    assert "lcm" in proc.stdout and "dip" in proc.stdout

    proc = cli(
        "evaluate",
        "--model",
        str(trained_export),
        "--task",
        "superres",
        "--images",
        str(tmp_path / "clean"),
        "--out",
        str(tmp_path / "ev2"),
        "--iterations",
        "2",
        "--baselines",
        "naive",
        "--finish",
        "consistent",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ev2" / "report.json").read_text())
    # The naive baseline as defined, and with the LCM's finish (never further from the truth)
    assert list(report["mean"]) == ["lcm", "naive", "naive+consistent"]
    assert "psnr_hole" not in report["mean"]["lcm"]
    for image in report["images"]:
        assert image["naive+consistent"]["psnr"] >= image["naive"]["psnr"]
    assert (report["settings"]["optimizer"], report["settings"]["lr"]) == ("adam", 0.01)

    # DIP alone, read out after 1 and 3 iterations of one fit per image.
    proc = cli(
        "evaluate",
        "--model",
        str(trained_export),
        "--task",
        "colorize",
        "--images",
        str(tmp_path / "clean"),
        "--out",
        str(tmp_path / "ev3"),
        "--no-lcm",
        "--baselines",
        "dip",
        "--dip-iterations",
        "3,1",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ev3" / "report.json").read_text())
    assert list(report["mean"]) == ["dip@1", "dip@3"]
    assert [report["methods"][m]["iterations"] for m in report["mean"]] == [1, 3]
    assert report["settings"]["dip_iterations"] == [1, 3]
