"""Export: a run's newest commit as a Zarr group + safetensors that need no lcm-dist to read."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from tests.helpers import PYTHON, run_config, subprocess_env

READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, zarr
    from safetensors.numpy import load
    import fsspec

    url, options = sys.argv[1], json.loads(sys.argv[2])
    group = zarr.open_group(url, mode="r", storage_options=options or None)
    attrs = dict(group.attrs)
    with fsspec.open(url.rstrip("/") + "/" + attrs["generator"], "rb", **options) as f:
        weights = load(f.read())
    out = sys.argv[3]
    np.savez(
        out,
        latents=group["latents"][:],
        noise=group["noise"][:],
        initial_phi=group["initial_phi"][:],
        keys=np.array(list(group["keys"][:])),
        **{"gen." + k: v for k, v in weights.items()},
    )
    with open(out + ".json", "w") as f:
        json.dump(attrs, f)
    assert not any(m.startswith("lcm_dist") for m in sys.modules), "lcm_dist was imported"
    """
)


def read_without_lcm_dist(tmp_path, url, options=None):
    """Read an export in a fresh interpreter that never imports lcm_dist."""
    script = tmp_path / "reader.py"
    script.write_text(READER)
    out = tmp_path / "read.npz"
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [PYTHON, str(script), url, json.dumps(options or {}), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = dict(np.load(out))
    attrs = json.loads((tmp_path / "read.npz.json").read_text())
    return data, attrs


def committed_state(run_dir):
    from safetensors.torch import load_file

    from lcm_dist.latents.store import LatentStore
    from lcm_dist.train.checkpoint import find_latest

    commit = find_latest(run_dir)
    store = LatentStore.open(commit.state["store_url"], mode="r")
    store.restore_slots(commit.slots)
    rows = store.read_rows(range(commit.state["num_images"]))
    return commit, rows, load_file(str(commit.folder / "generator.safetensors"))


def test_export_is_read_by_plain_zarr_and_safetensors(tmp_path, trained_run, demo64_shards, cli):
    from lcm_dist.config import model_from_dict
    from lcm_dist.data.loader import ShardLoader
    from lcm_dist.data.shards import load_keys
    from lcm_dist.model.generator import Generator
    from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi, make_noise
    from lcm_dist.model.loss import lcm_loss

    out = tmp_path / "model.zarr"
    proc = cli("export", "--run", str(trained_run), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported 64 latents (step 16" in proc.stdout

    data, attrs = read_without_lcm_dist(tmp_path, str(out))
    commit, rows, weights = committed_state(trained_run)
    assert attrs["complete"] and attrs["step"] == 16 and attrs["num_images"] == 64
    assert attrs["checkpoint"] == commit.tag
    np.testing.assert_array_equal(data["latents"], rows)  # row i = image i, as trained
    assert data["latents"].shape == (64, 24448) and data["latents"].dtype == np.float32
    assert list(data["keys"]) == load_keys(demo64_shards)
    assert {k[4:] for k in data if k.startswith("gen.")} == set(weights)
    for name, tensor in weights.items():
        np.testing.assert_array_equal(data["gen." + name], tensor.numpy())

    # The attributes alone rebuild the model: the noise and initial phi match, and row i of the
    # exported latents reconstructs image i better than the initial phi or another image's row.
    model = model_from_dict(attrs["model"])
    np.testing.assert_array_equal(data["noise"], make_noise(model).numpy())
    np.testing.assert_array_equal(data["initial_phi"], initial_phi(model).numpy())
    assert sum(np.prod(s["shape"]) for s in attrs["phi_layout"]) == attrs["phi_size"]
    net, gen = BatchedLatentNet(model), Generator(model)
    gen.load_state_dict({k: torch.from_numpy(data["gen." + k]) for k in weights})
    gen.eval()  # restoration uses the running statistics of training
    loader = ShardLoader(str(demo64_shards), batch_size=64, num_workers=0, image_size=64)
    batch = next(iter(loader))
    latents = torch.from_numpy(data["latents"])
    candidates = {
        "trained": latents[batch.rows],
        "initial": torch.from_numpy(data["initial_phi"]).expand(64, -1),
        "other image's": latents[batch.rows.roll(1)],
    }
    with torch.no_grad():
        loss = {
            name: float(lcm_loss(gen(net(phi)), batch.images, **attrs["loss"])["loss"])
            for name, phi in candidates.items()
        }
    assert loss["trained"] < 0.97 * min(loss["initial"], loss["other image's"]), loss


def test_export_to_object_storage(tmp_path, trained_run, s3_server, cli):
    prefix, options = s3_server
    url = f"{prefix}/exports/model.zarr"
    proc = cli(
        "export",
        "--run",
        str(trained_run),
        "--out",
        url,
        "--out-options",
        json.dumps(options),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data, attrs = read_without_lcm_dist(tmp_path, url, options)
    _, rows, weights = committed_state(trained_run)
    np.testing.assert_array_equal(data["latents"], rows)
    np.testing.assert_array_equal(data["gen.out.weight"], weights["out.weight"].numpy())

    # An existing export is never overwritten by accident.
    proc = cli(
        "export",
        "--run",
        str(trained_run),
        "--out",
        url,
        "--out-options",
        json.dumps(options),
        "--quiet",
    )
    assert proc.returncode == 2
    assert f"{url} already exists; pass --overwrite to replace it" in proc.stderr


def test_open_export_refuses_incomplete_and_foreign(tmp_path, trained_run):
    import zarr

    from lcm_dist.export import ExportError, export_run, open_export

    out = tmp_path / "model.zarr"
    export_run(trained_run, str(out), progress=False)
    group, attrs = open_export(str(out))
    assert attrs["num_images"] == 64 and group["latents"].shape == (64, 24448)

    group = zarr.open_group(str(out), mode="r+")
    group.attrs["complete"] = False  # as an export interrupted before its last write leaves it
    with pytest.raises(ExportError, match="is incomplete .*export again"):
        open_export(str(out))
    group.attrs.update({"complete": True, "version": 99})
    with pytest.raises(ExportError, match="has format version 99"):
        open_export(str(out))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(ExportError, match="is not an lcm-dist export"):
        open_export(str(tmp_path / "other.zarr"))
    with pytest.raises(ExportError, match="no export at"):
        open_export(str(tmp_path / "missing.zarr"))

    # Writing where no folder can be made names the place and the system's reason, nothing more.
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "model.zarr"
    with pytest.raises(ExportError) as err:
        export_run(trained_run, str(bad), progress=False)
    assert str(err.value) == f"cannot create the export at {bad}: not a directory"


def test_export_errors(tmp_path, demo_shards, cli):
    proc = cli("export", "--run", str(tmp_path / "nothing"), "--out", "x.zarr")
    assert proc.returncode == 2
    assert "is not a run directory" in proc.stderr and "Traceback" not in proc.stderr

    # A run killed before its first checkpoint has nothing to export.
    run = tmp_path / "run"
    run.mkdir()
    cfg_path = run_config(tmp_path, demo_shards)
    from lcm_dist.config import load_config, write_resolved_config

    write_resolved_config(load_config(cfg_path), run)
    proc = cli("export", "--run", str(run), "--out", str(tmp_path / "x.zarr"))
    assert proc.returncode == 2
    assert "has no committed checkpoint to export yet" in proc.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_export_finds_a_runs_relative_paths_from_any_directory(
    tmp_path, demo_shards, monkeypatch, cli
):
    # A run configured with relative paths (as users write them) trains from its project
    # folder; exporting it from elsewhere still finds its shards and latent store.
    import shutil

    from lcm_dist.export import export_run

    project = tmp_path / "project"
    shutil.copytree(demo_shards, project / "data" / "shards")
    cfg = json.loads(run_config(tmp_path, demo_shards, train={"max_steps": 2}).read_text())
    cfg["run_dir"] = "runs/r"
    cfg["data"]["shards"] = "data/shards"
    (project / "config.json").write_text(json.dumps(cfg))
    proc = cli("train", "--config", "config.json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (project / "runs" / "r" / "latents.zarr").is_dir()
    attrs = export_run(project / "runs" / "r", str(tmp_path / "out.zarr"), progress=False)
    assert attrs["step"] == 2 and attrs["complete"]

    # A copy of the run folder exports its own latent store (the default store lives in the
    # run folder), even from the original's project folder, where runs/r/latents.zarr exists.
    from lcm_dist.export import ExportError

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(project / "runs" / "r", copy)
    monkeypatch.chdir(project)
    shards = str(project / "data" / "shards")
    export_run(copy, str(tmp_path / "copy.zarr"), shards=shards, progress=False)
    shutil.rmtree(copy / "latents.zarr")
    with pytest.raises(ValueError, match=f"no latent store at {copy / 'latents.zarr'}"):
        export_run(copy, str(tmp_path / "copy2.zarr"), shards=shards, progress=False)
    with pytest.raises(ExportError, match="--shards must name the folder of the run's shards"):
        export_run(copy, str(tmp_path / "copy3.zarr"), shards=str(tmp_path), progress=False)


def test_an_export_during_a_new_commit_is_refused(tmp_path, trained_run, monkeypatch):
    from lcm_dist import commits as checkpoint
    from lcm_dist.export import ExportError, export_run

    copied = checkpoint.find_latest(trained_run).tag
    # The run commits again while the export copies: the pointer, read after the copy, moved on.
    monkeypatch.setattr(checkpoint, "committed_tag", lambda run: "step-99999999")
    with pytest.raises(ExportError) as err:
        export_run(trained_run, str(tmp_path / "model.zarr"), progress=False)
    assert str(err.value) == (
        f"the run in {trained_run} committed step-99999999 while this export copied the "
        f"latents of {copied}, and may have rewritten some of them; export again after it "
        "stops (or right after a checkpoint)"
    )
