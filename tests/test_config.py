"""Strict config loading: errors name the dotted path of the bad key."""

import json

import pytest

from lcm_dist.config import (
    apply_overrides,
    config_from_dict,
    load_config,
    parse_json_text,
    write_resolved_config,
)

BASE = {
    "run_dir": "runs/x",
    "train": {"max_steps": 5},
    "data": {"shards": "data/shards"},
    "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 1.0}}},
}


def write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_minimal_config_fills_preset(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.preset == "demo32"
    assert cfg.model.image_size == 32
    assert cfg.model.gen_encoder_widths == (64, 128, 256)
    assert cfg.train.inner_steps == 50


def test_paper_preset(tmp_path):
    cfg = load_config(write(tmp_path, {**BASE, "model": {"preset": "paper"}}))
    assert (cfg.model.image_size, cfg.model.noise_size) == (128, 40)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"train": {"max_steps": 5, "lr_phy": 1.0}}, "unknown config key 'train.lr_phy'"),
        ({"modle": {}}, "unknown config key 'modle'"),
        ({"train": {"max_steps": "5"}}, "'train.max_steps' must be an integer"),
        ({"train": {"max_steps": 0}}, "'train.max_steps' is 0; it must be >= 1"),
        ({"train": {}}, "missing required config key 'train.max_steps'"),
        ({"model": {"preset": "huge"}}, "'model.preset'"),
        ({"model": {"latent_widths": [8, "x"]}}, "'model.latent_widths[1]'"),
        ({"model": {"image_size": 48}}, "'model.image_size' (48) must be 4 times"),
        ({"model": {"noise_size": 20}}, "latent grid side 12 (model.noise_size"),
        ({"model": {"gen_head_widths": [16]}}, "'model.gen_head_widths' must list 2"),
        ({"model": {"gen_encoder_widths": [8, 8, 9]}}, "end in an even width"),
        ({"data": {"shards": "s", "batch_size": -1}}, "'data.batch_size'"),
        ({"data": {"batch_size": 4}}, "'data.shards' must name"),
        (
            {
                "log": {"restore_every_steps": 5, "restore_images": "held/"},
                "deepspeed": {**BASE["deepspeed"], "bf16": {"enabled": True}},
            },
            "cannot be used with deepspeed.fp16 or deepspeed.bf16",
        ),
        ({"log": {"progress": 1}}, "'log.progress' must be true or false"),
        ({"checkpoint": {"keep_latest": 0}}, "'checkpoint.keep_latest' is 0; it must be >= 1"),
        ({"checkpoint": {"every_steps": -1}}, "'checkpoint.every_steps' is -1; it must be >= 0"),
        ({"deepspeed": {}}, "'deepspeed.optimizer' is missing"),
        ({"deepspeed": {"optimizer": {"typ": "SGD"}}}, "'deepspeed.optimizer' must name"),
        (
            {"deepspeed": {"optimizer": {"type": "SGD", "param": {"lr": 1}}}},
            "unknown config key 'deepspeed.optimizer.param'",
        ),
        (
            {"deepspeed": {"optimizer": {"type": "SGD", "params": 0.1}}},
            "'deepspeed.optimizer.params' must be an object",
        ),
        (
            {"deepspeed": {**BASE["deepspeed"], "train_micro_batch_size_per_gpu": 3}},
            "differs from 'data.batch_size'",
        ),
    ],
)
def test_bad_values_name_their_path(tmp_path, patch, message):
    path = write(tmp_path, {**BASE, **patch})
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_duplicate_key_is_an_error_with_path(tmp_path):
    text = '{"run_dir": "r", "train": {"max_steps": 1, "max_steps": 2}, "deepspeed": {}}'
    with pytest.raises(ValueError, match=r"duplicate config key 'train\.max_steps'"):
        load_config(write(tmp_path, text))


def test_invalid_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{"run_dir": "r",\n "train": }')
    with pytest.raises(ValueError, match=r"c\.json is not valid JSON \(line 2"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_overrides_use_the_typed_loader(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(
        path, ["train.lr_phi=0.5", "model.preset=demo64", "deepspeed.zero_optimization.stage=2"]
    )
    assert cfg.train.lr_phi == 0.5
    assert cfg.model.image_size == 64
    assert cfg.deepspeed["zero_optimization"] == {"stage": 2}
    with pytest.raises(ValueError, match="unknown config key 'train.bogus'"):
        load_config(path, ["train.bogus=1"])
    with pytest.raises(ValueError, match="must be an integer"):
        load_config(path, ["train.max_steps=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(BASE, ["train.max_steps"])
    # A bad value from the command line is blamed on its --set, a bad file on the file.
    with pytest.raises(
        ValueError, match=r"^--set data.batch_size=0: .*batch_size' is 0; it must be >= 1"
    ):
        load_config(path, ["train.lr_phi=0.5", "data.batch_size=0", "train.seed=1"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**BASE, "data": {**BASE["data"], "batch_size": 0}}))
    with pytest.raises(ValueError, match=rf"^{bad}: .*batch_size' is 0; it must be >= 1"):
        load_config(bad, ["train.lr_phi=0.5"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    out = write_resolved_config(cfg, tmp_path / "run")
    again = config_from_dict(parse_json_text(out.read_text(), str(out)))
    assert again == cfg


def test_shipped_configs_load():
    for name in ("configs/demo.json", "configs/big.json"):
        cfg = load_config(name)
        assert cfg.train.max_steps > 0
    assert load_config("configs/big.json").model.preset == "paper"
