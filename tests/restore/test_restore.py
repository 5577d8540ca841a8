"""Restoration: degradation operators, the masked data term, fitting phi, the CLIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_dist.restore.degrade import (
    Colorize,
    Degradation,
    Inpaint,
    SuperRes,
    box_mask,
    finish,
    make_operator,
    mask_from_file,
    random_boxes_mask,
    random_pixels_mask,
)
from tests.helpers import save_images


def test_inpaint_hole_pixels_never_influence_the_loss():
    torch.manual_seed(0)
    known = random_boxes_mask(2, 32, boxes=3, seed=1)
    op = Inpaint(known)
    clean = torch.rand(2, 3, 32, 32)
    y = op(clean)
    x_hat = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = op.data_term(x_hat, y)
    loss.sum().backward()
    hole = op.hole(2).expand(-1, 3, -1, -1)
    assert hole.any() and (~hole).any()
    assert (x_hat.grad[hole] == 0).all()
    assert (x_hat.grad[~hole] != 0).any()
    # Anything in the hole gives the same loss; the observation's hole pixels are zero.
    other = x_hat.detach().clone()
    other[hole] = torch.rand(int(hole.sum()))
    torch.testing.assert_close(op.data_term(other, y), loss.detach(), rtol=0, atol=0)
    assert (y[hole] == 0).all()
    # The clean image has zero data term, whatever is under the hole.
    assert torch.all(op.data_term(clean, y) == 0)


def test_masks():
    known = box_mask(64, 0.5)
    assert known.shape == (1, 1, 64, 64) and int((known == 0).sum()) == 32 * 32
    assert known[0, 0, 16:48, 16:48].sum() == 0 and known[0, 0, :16].all()
    pixels = random_pixels_mask(4, 64, 0.3, seed=0)
    assert abs(float(1 - pixels.mean()) - 0.3) < 0.02
    assert not torch.equal(pixels[0], pixels[1])
    torch.testing.assert_close(random_boxes_mask(2, 32, seed=3), random_boxes_mask(2, 32, seed=3))
    with pytest.raises(ValueError, match="between 0 and 1"):
        box_mask(64, 1.5)
    with pytest.raises(ValueError, match="choose one of"):
        make_operator("inpaint", 64, 1, box=0.5, random_pixels=0.2)
    with pytest.raises(ValueError, match="--random-boxes must be >= 0, got -1"):
        make_operator("inpaint", 64, 1, random_boxes=-1)
    with pytest.raises(ValueError, match=r"--box must be in \(0, 1\), got 1.5"):
        make_operator("inpaint", 64, 1, box=1.5)
    with pytest.raises(ValueError, match="mask file nowhere.png does not exist"):
        make_operator("inpaint", 64, 1, mask="nowhere.png")
    with pytest.raises(ValueError, match="are for --task inpaint"):
        make_operator("superres", 64, 1, box=0.5)
    with pytest.raises(ValueError, match="size 60 is not divisible by --factor 8"):
        make_operator("superres", 60, 1, factor=8)


def test_mask_file_white_is_hole_and_size_is_checked(tmp_path):
    arr = np.zeros((32, 32), dtype=np.uint8)
    arr[4:10, 8:20] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    known = mask_from_file(str(tmp_path / "m.png"), 32)
    assert known.shape == (1, 1, 32, 32)
    assert known[0, 0, 4:10, 8:20].sum() == 0 and int(known.sum()) == 32 * 32 - 6 * 12
    with pytest.raises(ValueError, match=r"mask .*m.png is 32x32 but the model's images are 64x64"):
        mask_from_file(str(tmp_path / "m.png"), 64)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "none.png")
    with pytest.raises(ValueError, match=r"the mask .*none.png has no hole"):
        make_operator("inpaint", 32, 1, mask=str(tmp_path / "none.png"))
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(tmp_path / "all.png")
    with pytest.raises(ValueError, match=r"the mask .*all.png is all hole"):
        make_operator("inpaint", 32, 1, mask=str(tmp_path / "all.png"))


def test_superres_is_area_downsampling_and_bicubic_naive():
    op = SuperRes(4)
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 3, 8, 8) / 64
    y = op(x)
    assert y.shape == (1, 3, 2, 2)
    torch.testing.assert_close(y[0, 0, 0, 0], x[0, 0, :4, :4].mean())
    assert op.observed_size(64) == 16
    flat = torch.full((1, 3, 4, 4), 0.3)
    torch.testing.assert_close(op.naive(flat), torch.full((1, 3, 16, 16), 0.3))
    assert op.show(flat).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="must be 2, 4 or 8"):
        SuperRes(3)
    # The data term at 1/8 of 32px (4x4) still works: the pyramid is shortened to fit.
    assert SuperRes(8).data_term(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 4, 4)).shape == (2,)


def test_colorize_is_luma():
    op = Colorize()
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(op(x), torch.full((1, 1, 2, 2), 0.299))
    gray = torch.rand(1, 1, 4, 4).expand(1, 3, 4, 4)
    torch.testing.assert_close(op(gray), gray[:, :1])  # weights sum to 1
    assert op.naive(op(gray)).shape == (1, 3, 4, 4)


def test_naive_inpainting_fills():
    known = box_mask(16, 0.5)
    flat = torch.full((1, 3, 16, 16), 0.6)
    for fill in ("mean", "biharmonic"):
        op = Inpaint(known, fill)
        torch.testing.assert_close(op.naive(op(flat)), flat, atol=1e-5, rtol=0)


def test_consistent_outputs_agree_with_the_observation_and_never_move_away_from_the_truth():
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 16, 16, generator=gen)
    for op in (SuperRes(4), Colorize(), Inpaint(box_mask(16, 0.5))):
        y = op(clean)
        guess = (clean + 0.3 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
        out = finish(op, y, guess, "consistent")
        assert out.min() >= 0 and out.max() <= 1
        if op.name != "colorize":  # a least-squares projection: nearer the clean image
            before = (guess - clean).pow(2).flatten(1).sum(1)
            after = (out - clean).pow(2).flatten(1).sum(1)
            assert (after <= before + 1e-6).all() and (after < before).any(), op.name
        # In the open box (nothing clamped) the observation is met exactly
        mid = (0.25 + 0.5 * clean).clamp(0, 1)
        near = (mid + 0.05 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
        torch.testing.assert_close(op(finish(op, op(mid), near, "consistent")), op(mid))
        assert finish(op, y, guess, "raw") is guess
    torch.testing.assert_close(SuperRes(4).consistent(SuperRes(4)(clean), clean), clean)
    # Colorization keeps the generated colour differences and takes the observed luma
    mid = 0.25 + 0.5 * clean
    tinted = mid + torch.tensor([0.05, -0.02, 0.04]).view(1, 3, 1, 1)
    out = Colorize().consistent(Colorize()(mid), tinted)
    torch.testing.assert_close(out - out[:, 1:2], tinted - tinted[:, 1:2])
    torch.testing.assert_close(Colorize()(out), Colorize()(mid))


def test_restoring_an_undegraded_image_reproduces_it(trained_export, demo64_shards):
    from lcm_dist.data.loader import ShardLoader
    from lcm_dist.evaluate.metrics import psnr
    from lcm_dist.restore.fit import fit_phi
    from lcm_dist.restore.model import load_model

    model = load_model(str(trained_export))
    batch = next(iter(ShardLoader(str(demo64_shards), batch_size=4, num_workers=0, image_size=64)))
    rows = batch.rows.tolist()
    as_trained = model.reconstruct(rows)
    with torch.no_grad():
        untrained = model.render(model.initial_phi.expand(4, -1))
    fitted, _ = fit_phi(model, batch.images, Degradation(), iterations=300)
    for i in range(4):
        clean = batch.images[i]
        got = psnr(fitted[i], clean)
        # A fresh phi fitted to a training image reproduces it at least as well as the phi
        # training gave it, and better than the untrained initial phi (this test model is
        # trained for 16 steps only, so its range is narrow).
        assert got >= psnr(as_trained[i], clean) - 0.1
        assert got >= psnr(untrained[i], clean) + 0.5
    # Images the generator can produce exactly (their trained phi's reconstructions). The fit
    # keeps each image's best phi, its start included, so it never ends worse than the initial
    # phi on its own objective; and it reproduces most of them to within rounding. Not all: the
    # trained phi lie within ~0.001 of the clamped initial phi, and for row 3 the straight path
    # there first climbs (loss 0.061 -> 0.064 a quarter of the way, measured) into a basin the
    # fit does not reach (it ends at the initial phi, 16.0 dB, whatever the arithmetic: float32
    # and float64 fits of these rows agree to 1.4 dB at 50-60 dB and exactly on row 3).
    fitted, phi = fit_phi(model, as_trained, Degradation(), iterations=300)
    with torch.no_grad():
        start = Degradation().data_term(
            model.render(model.initial_phi.expand(4, -1)), as_trained, **model.loss
        )
        end = Degradation().data_term(model.render(phi), as_trained, **model.loss)
    assert (end <= start).all(), (end, start)
    reached = [psnr(fitted[i], as_trained[i]) for i in range(4)]
    assert sorted(reached)[1] > 40, reached


def test_fit_settings_per_task():
    from lcm_dist.restore.fit import fit_settings

    assert fit_settings("inpaint") == ("sgd", 0.5)
    assert fit_settings("superres") == ("adam", 0.01)
    assert fit_settings("inpaint", "adam") == ("adam", 0.01)  # that optimizer's own default
    assert fit_settings("superres", "sgd", 0.1) == ("sgd", 0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        fit_settings("inpaint", "lbfgs")
    with pytest.raises(ValueError, match="must be positive"):
        fit_settings("inpaint", lr=0.0)


def test_starting_phi_default_mean_and_nearest(trained_export):
    import zarr

    from lcm_dist.restore.fit import fit_phi, starting_phi
    from lcm_dist.restore.model import load_model

    model = load_model(str(trained_export))
    latents = np.asarray(zarr.open_group(str(trained_export), mode="r")["latents"][:])
    op = make_operator("inpaint", 64, 3)
    y = op(model.reconstruct([5, 40, 63]))
    start = starting_phi(model, y, op, "default")
    assert torch.equal(start, model.initial_phi.expand(3, -1))
    start = starting_phi(model, y, op, "mean")
    torch.testing.assert_close(start[1], torch.from_numpy(latents.mean(0)), rtol=0, atol=1e-6)
    # Training images observed through the hole: each starts from its own trained phi (all
    # 64 rows are candidates), whatever else is in its batch.
    start = starting_phi(model, y, op, "nearest")
    assert torch.equal(start, torch.from_numpy(latents[[5, 40, 63]]))
    assert torch.equal(starting_phi(model, y[1:2], op, "nearest")[0], start[1])
    # A fit never ends worse than it started, so from the nearest start it stays close.
    _, _, loss = fit_phi(model, y, op, iterations=5, init="nearest", return_loss=True)
    start_loss = op.data_term(model.reconstruct([5, 40, 63]), y, **model.loss)
    assert (loss <= start_loss + 1e-6).all()
    with pytest.raises(ValueError, match="unknown --init 'best'"):
        starting_phi(model, y, op, "best")


def test_sgd_inpainting_fits_the_known_pixels(trained_export):
    from lcm_dist.restore.fit import fit_phi
    from lcm_dist.restore.model import load_model

    # The default inpainting fit (plain SGD) lowers every image's data term steadily.
    model = load_model(str(trained_export))
    as_trained = model.reconstruct([0, 1, 2])
    op = make_operator("inpaint", 64, 3)
    losses = []
    fit_phi(model, op(as_trained), op, iterations=40, on_step=lambda it, loss: losses.append(loss))
    assert (losses[-1] < 0.5 * losses[0]).all(), (losses[0], losses[-1])


def test_run_folder_as_model_and_bad_rows_are_clear_errors(trained_run, trained_export):
    from lcm_dist.export import ExportError
    from lcm_dist.restore.model import load_model

    with pytest.raises(ExportError, match="is a training run, not an export; make one with"):
        load_model(str(trained_run))
    model = load_model(str(trained_export))
    with pytest.raises(ValueError, match=r"row -1 is not a row number \(rows are 0 to 63\)"):
        model.row_of("-1")
    with pytest.raises(ValueError, match="row 64 is outside the export's 64 training images"):
        model.row_of(64)


def test_each_image_restores_as_if_alone(trained_export):
    # Fitting a batch is fitting each image on its own: an image's output and the gradient of
    # the batch's loss with respect to its phi do not depend on the other images (up to float
    # summation order; Adam then amplifies such rounding, so whole fits are not compared).
    from lcm_dist.restore.model import load_model

    model = load_model(str(trained_export))
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    op = make_operator("inpaint", 64, 3, random_boxes=2, seed=0)
    phi = model.initial_phi.expand(3, -1) + 1e-3 * torch.randn(3, model.initial_phi.numel())
    phi.requires_grad_(True)
    out = model.render(phi)
    op.data_term(out, op(images), **model.loss).sum().backward()
    one = phi[1:2].detach().clone().requires_grad_(True)
    alone = model.render(one)
    sub = op.subset(slice(1, 2))
    sub.data_term(alone, sub(images[1:2]), **model.loss).sum().backward()
    torch.testing.assert_close(out[1:2].detach(), alone.detach(), atol=1e-6, rtol=0)
    scale = float(one.grad.abs().max())
    torch.testing.assert_close(phi.grad[1:2], one.grad, atol=1e-5 * scale, rtol=0)


def _restore(cli, export, task, *args):
    """launch/restore.py on ``export`` for ``task`` with further arguments."""
    return cli("restore", "--model", str(export), "--task", task, *args)


def test_restore_cli(tmp_path, trained_export, cli):
    from lcm_dist.restore.model import load_model

    torch.manual_seed(0)
    save_images(torch.rand(3, 3, 64, 64), tmp_path / "in")
    proc = _restore(
        cli,
        trained_export,
        "inpaint",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--iterations",
        "5",
        "--save-latents",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    import zarr

    # The observed pixels are kept; only the hole (the centred half-size box) is the model's.
    known = box_mask(64, 0.5)[0, 0].numpy() > 0.5
    given = np.asarray(Image.open(tmp_path / "in" / "img0.png"), dtype=np.int16)
    restored = np.asarray(Image.open(tmp_path / "out" / "img0.png"), dtype=np.int16)
    assert np.abs(restored - given)[known].max() <= 1
    assert np.abs(restored - given)[~known].mean() > 10
    proc = _restore(
        cli,
        trained_export,
        "inpaint",
        str(tmp_path / "in" / "img0.png"),
        "--out",
        str(tmp_path / "raw"),
        "--iterations",
        "5",
        "--raw",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = np.asarray(Image.open(tmp_path / "raw" / "img0.png"), dtype=np.int16)
    assert np.abs(raw - given)[known].mean() > 10  # the model's own rendering everywhere
    saved = zarr.open_group(str(tmp_path / "out" / "latents.zarr"))
    assert saved["latents"].shape == (3, 24448)
    assert (saved.attrs["optimizer"], saved.attrs["lr"]) == ("sgd", 0.5)

    # Super-resolution takes images of the model's size / factor.
    save_images(torch.rand(2, 3, 16, 16), tmp_path / "small")
    proc = _restore(
        cli,
        trained_export,
        "superres",
        str(tmp_path / "small"),
        "--factor",
        "4",
        "--out",
        str(tmp_path / "sr"),
        "--iterations",
        "3",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "sr" / "img0.png").size == (64, 64)

    # Wrong sizes are clear errors.
    proc = _restore(
        cli,
        trained_export,
        "colorize",
        str(tmp_path / "small"),
        "--out",
        str(tmp_path / "c"),
        "--quiet",
    )
    assert proc.returncode == 2
    assert "img0.png is 16x16 but this model restores 64x64 images" in proc.stderr
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "mask.png")
    proc = _restore(
        cli,
        trained_export,
        "inpaint",
        str(tmp_path / "in"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--out",
        str(tmp_path / "m"),
    )
    assert proc.returncode == 2
    assert "mask.png is 16x16 but the model's images are 64x64" in proc.stderr

    # Training images by row or key, from the exported latents.
    model = load_model(str(trained_export))
    key = list(model.group["keys"][:])[5]
    proc = cli(
        "restore",
        "--model",
        str(trained_export),
        "--reconstruct",
        "3",
        key,
        "--out",
        str(tmp_path / "rec"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.asarray(Image.open(tmp_path / "rec" / "row00000005.png"), dtype=np.float32) / 255
    expected = model.reconstruct([5])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1 / 255)
    assert (tmp_path / "rec" / "row00000003.png").exists()


def test_bad_exports_are_refused(tmp_path, trained_export, cli):
    import shutil

    import zarr

    from lcm_dist.export import ExportError
    from lcm_dist.restore.model import load_model

    broken = tmp_path / "broken.zarr"
    shutil.copytree(trained_export, broken)
    (broken / "generator.safetensors").unlink()
    with pytest.raises(ExportError, match="has no generator weights"):
        load_model(str(broken))
    group = zarr.open_group(str(broken), mode="r+")
    group.attrs["version"] = 2
    proc = cli(
        "restore",
        "--model",
        str(broken),
        "--reconstruct",
        "0",
        "--out",
        str(tmp_path / "x"),
    )
    assert proc.returncode == 2
    assert "has format version 2; this lcm-dist reads version 1" in proc.stderr


def _copy_export(trained_export, to):
    import shutil

    shutil.copytree(trained_export, to)
    return to


def test_damaged_exports_are_refused_with_the_array_named(tmp_path, trained_export):
    import numpy as np
    import zarr
    from safetensors.numpy import load, save

    from lcm_dist.export import ExportError
    from lcm_dist.restore.model import load_model

    # Generator weights of the wrong shape.
    bad = _copy_export(trained_export, tmp_path / "shape.zarr")
    weights = load((bad / "generator.safetensors").read_bytes())
    name = next(k for k, v in weights.items() if v.ndim == 4)
    weights[name] = np.zeros((1, 1, 1, 1), np.float32)
    (bad / "generator.safetensors").write_bytes(save(weights))
    with pytest.raises(ExportError, match=r"generator.safetensors does not fit .*size mismatch"):
        load_model(str(bad))

    # An array whose chunk was lost in a copy reads as its fill value.
    lost = _copy_export(trained_export, tmp_path / "lost.zarr")
    for chunk in (lost / "noise" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    with pytest.raises(ExportError, match="array 'noise' is empty or damaged"):
        load_model(str(lost))

    # Latents of the wrong shape.
    shaped = _copy_export(trained_export, tmp_path / "shaped.zarr")
    group = zarr.open_group(str(shaped), mode="r+")
    n = group["latents"].shape[0]
    group.create_array("latents", shape=(n, 7), dtype="float32", overwrite=True)
    with pytest.raises(ExportError, match=r"array 'latents' has shape \(\d+, 7\)"):
        load_model(str(shaped))

    # A codec lcm-dist does not decode is refused before any data is read.
    codec = _copy_export(trained_export, tmp_path / "codec.zarr")
    group = zarr.open_group(str(codec), mode="r+")
    noise = group["noise"][:]
    group.create_array(
        "noise",
        data=noise,
        filters=[zarr.codecs.numcodecs.Delta(dtype="float32")],
        overwrite=True,
    )
    with pytest.raises(ExportError, match="array 'noise' .* uses the codec"):
        load_model(str(codec))

    # A Zarr v2 group is not an export (v2 metadata can name a pickle filter).
    v2 = tmp_path / "v2.zarr"
    zarr.open_group(str(v2), mode="w", zarr_format=2).attrs["format"] = "lcm-dist-export"
    with pytest.raises(ExportError, match=r"no export at .*v2.zarr"):
        load_model(str(v2))


def test_missing_latent_rows_are_an_error(tmp_path, trained_export):
    from lcm_dist.export import ExportError
    from lcm_dist.restore.model import load_model

    lost = _copy_export(trained_export, tmp_path / "lost.zarr")
    for chunk in (lost / "latents" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    model = load_model(str(lost))
    with pytest.raises(ExportError, match="the latents of row 0 are missing"):
        model.reconstruct([0])


def test_restore_cli_refuses_clashing_outputs(tmp_path, trained_export, cli):
    torch.manual_seed(0)
    save_images(torch.rand(1, 3, 64, 64), tmp_path / "a")
    save_images(torch.rand(1, 3, 64, 64), tmp_path / "b")
    common = ["--model", str(trained_export), "--task", "inpaint", "--quiet"]
    proc = cli(
        "restore",
        *common,
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 2
    assert "would both be restored to img0.png" in proc.stderr
    proc = cli("restore", *common, str(tmp_path / "a"), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "would overwrite it" in proc.stderr
    proc = cli(
        "restore",
        *common,
        str(tmp_path / "a"),
        "--out",
        str(tmp_path / "o"),
        "--model-options",
        "[1]",
    )
    assert proc.returncode == 2 and "--model-options must be a JSON object" in proc.stderr
    # An output folder that cannot exist is named before any fitting (evaluate.py too).
    (tmp_path / "a-file").write_text("")
    proc = cli("restore", *common, str(tmp_path / "a"), "--out", str(tmp_path / "a-file"))
    assert proc.returncode == 2
    assert f"error: the output folder {tmp_path / 'a-file'} is a file, not a folder" in proc.stderr
    proc = cli(
        "evaluate",
        *common,
        "--images",
        str(tmp_path / "a"),
        "--out",
        str(tmp_path / "a-file" / "ev"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot create the output folder" in proc.stderr and "not a directory" in proc.stderr


def test_ring_weight_options():
    import argparse

    from lcm_dist.restore.cli import add_fit_arguments, operator_from_args

    parser = argparse.ArgumentParser()
    add_fit_arguments(parser, task_required=True)
    args = parser.parse_args(
        ["--model", "m", "--task", "inpaint", "--ring-weight", "5", "--ring-width", "2"]
    )
    args.seed = 0
    op = operator_from_args(args, 16, 2)
    # A centred 8x8 hole grown by 2 pixels: a 12x12 square weighted 5, the rest 1.
    weight = op.pixel_weight()[0, 0]
    assert int((weight == 5).sum()) == 12 * 12 and int((weight == 1).sum()) == 16 * 16 - 144
    assert torch.all(weight[2:14, 2:14] == 5)
    assert op.subset(slice(0, 1)).pixel_weight() is not None
    # The default is the plain masked loss.
    assert make_operator("inpaint", 16, 2).pixel_weight() is None
    with pytest.raises(ValueError, match="--ring-weight needs --ring-width"):
        make_operator("inpaint", 16, 2, ring_weight=5)
    with pytest.raises(ValueError, match="are for --task inpaint"):
        make_operator("superres", 16, 2, ring_weight=5, ring_width=5)
    with pytest.raises(ValueError, match="--ring-weight must be positive"):
        make_operator("inpaint", 16, 2, ring_weight=-1, ring_width=5)


def test_preview_restores_in_eval_mode_and_puts_the_mode_back():
    """The in-training preview fits with BatchNorm's running statistics (eval mode: they stay
    as they are) and leaves the generator training, with its gradients on."""
    from lcm_dist.config import model_from_dict
    from lcm_dist.model.generator import Generator
    from lcm_dist.model.latent_net import BatchedLatentNet
    from lcm_dist.train.preview import inpainting_preview

    model = model_from_dict({"preset": "demo32"})
    gen, net = Generator(model), BatchedLatentNet(model)
    with torch.no_grad():
        gen(torch.rand(4, 64, 8, 8))  # running statistics away from their initial values
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    grid, psnr = inpainting_preview(
        gen, net, model, torch.rand(2, 3, 32, 32), iterations=2, loss={"levels": 4}
    )
    assert gen.training and all(p.requires_grad for p in gen.parameters())
    for name, value in gen.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert grid.shape[0] == 3 and np.isfinite(psnr)


def test_exported_batchnorm_statistics_are_the_trained_ones(trained_run, trained_export):
    """The running mean and variance and the batch counter travel from training through the
    checkpoint and the export into the restoring generator."""
    from safetensors.torch import load_file

    from lcm_dist.restore.model import load_model
    from lcm_dist.train.checkpoint import find_latest

    saved = load_file(str(find_latest(trained_run).folder / "generator.safetensors"))
    model = load_model(str(trained_export))
    assert not model.generator.training
    state = model.generator.state_dict()
    buffers = [k for k in state if "running_" in k or "num_batches_tracked" in k]
    assert len(buffers) == 3 * 12  # three per BatchNorm, twelve BatchNorms
    for name in buffers:
        # Saved in their own dtype: the batch counters stay integers.
        assert saved[name].dtype == state[name].dtype, name
        torch.testing.assert_close(state[name], saved[name], rtol=0, atol=0)
    # 16 batches of 8 inner steps each, every one a forward pass in train mode.
    assert int(state["enc1_bn.num_batches_tracked"]) == 128
    assert not torch.equal(
        state["dec4_bn.running_var"], torch.ones_like(state["dec4_bn.running_var"])
    )


def test_the_authors_recipe_sets_their_fit():
    import argparse

    from lcm_dist.restore.cli import add_fit_arguments, settle_fit_arguments

    parser = argparse.ArgumentParser()
    add_fit_arguments(parser, task_required=True)
    args = parser.parse_args(["--model", "m", "--task", "inpaint", "--recipe", "authors"])
    settle_fit_arguments(args)
    assert (args.optimizer, args.lr, args.iterations, args.finish) == ("sgd", 0.02, 3001, "raw")
    assert (args.ring_weight, args.ring_width, args.init) == (5.0, 5, "default")
    args = parser.parse_args(["--model", "m", "--task", "superres", "--recipe", "authors"])
    settle_fit_arguments(args)
    assert (args.optimizer, args.lr, args.ring_width) == ("sgd", 0.02, 0)
    args = parser.parse_args(
        ["--model", "m", "--task", "inpaint", "--raw", "--finish", "consistent"]
    )
    with pytest.raises(ValueError, match="--raw and --finish consistent contradict"):
        settle_fit_arguments(args)


def test_joint_refinement_lowers_the_data_term_and_leaves_the_model(trained_export):
    from lcm_dist.restore.fit import fit_phi
    from lcm_dist.restore.model import load_model

    model = load_model(str(trained_export))
    weights = {k: v.clone() for k, v in model.generator.state_dict().items()}
    op = make_operator("superres", 64, 2)
    y = op(model.reconstruct([3, 30]) * 0.8 + 0.1)  # not exactly an image it generates
    plain, phi = fit_phi(model, y, op, iterations=5)
    refined, phi2 = fit_phi(model, y, op, iterations=5, refine=10, refine_lr=1e-3)
    assert torch.equal(phi, phi2)  # the phi fit itself is unchanged
    before = op.data_term(plain, y, **model.loss)
    after = op.data_term(refined, y, **model.loss)
    assert (after < before).all(), (before, after)
    for k, v in model.generator.state_dict().items():
        assert torch.equal(v, weights[k]), k
