"""Strict config loading: errors name the dotted path of the bad key."""

import inspect
import json
import re
import typing
from pathlib import Path

import jsonschema
import pytest

from lcm_dist.config import (
    apply_overrides,
    config_from_dict,
    load_config,
    model_from_dict,
    parse_json_text,
    write_resolved_config,
)
from lcm_dist.config.deepspeed_keys import INITIALIZE_KEYS, SECTION_KEYS, TOP_LEVEL_KEYS
from tests.helpers import REPO, run_script

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
    names = sorted(Path("configs").glob("*.json"))
    assert len(names) >= 3
    for name in names:
        cfg = load_config(name)
        assert cfg.train.max_steps > 0
    assert load_config("configs/big.json").model.preset == "paper"


def test_unknown_key_suggests_the_closest(tmp_path):
    # Reported before the missing max_steps it causes: the typo is the fault to fix.
    path = write(tmp_path, {**BASE, "train": {"max_stpes": 5}})
    with pytest.raises(ValueError, match=r"'train\.max_stpes'; did you mean 'train\.max_steps'\?"):
        load_config(path)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"train": {"max_steps": True}}, "'train.max_steps' must be an integer, got True"),
        ({"train": {"max_steps": 5.0}}, "'train.max_steps' must be an integer, got 5.0"),
        ({"train": {"max_steps": 5, "lr_phi": "0.5"}}, "'train.lr_phi' must be a number"),
        ({"train": {"max_steps": 5, "lr_phi": float("nan")}}, "'train.lr_phi' must be finite"),
        ({"train": {"max_steps": 5, "lr_phi": 0}}, "'train.lr_phi' is 0; it must be positive"),
        ({"store": {"codec": "lz4"}}, "'store.codec' is 'lz4'; use 'none', 'zstd' or 'blosc'"),
        ({"store": {"storage_options": []}}, "'store.storage_options' must be an object"),
        ({"model": {"clamp": -1.0}}, "'model.clamp' is -1.0; it must be positive"),
        ({"model": 3}, "config section 'model' must be a JSON object, got 3"),
    ],
)
def test_values_are_strictly_typed(patch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict({**BASE, **patch}, "c.json")


def test_ints_are_accepted_for_floats():
    cfg = config_from_dict({**BASE, "train": {"max_steps": 5, "lr_phi": 2}})
    assert cfg.train.lr_phi == 2.0 and isinstance(cfg.train.lr_phi, float)


def test_model_from_dict_names_model_keys():
    assert model_from_dict({"preset": "paper"}).image_size == 128
    with pytest.raises(
        ValueError, match=r"^export\.json: .*'model\.latent_widths\[1\]' must be an"
    ):
        model_from_dict({"latent_widths": [8, "x"]}, "export.json")


DS = BASE["deepspeed"]


@pytest.mark.parametrize(
    ("deepspeed", "message"),
    [
        (
            {**DS, "zero_optimization": {"stgae": 2}},
            "'deepspeed.zero_optimization.stgae'; did you mean 'deepspeed.zero_optimization.stage'?",
        ),
        (
            {**DS, "zero_optimization": {"stage": 2, "offload_optimizer": {"devise": "cpu"}}},
            "did you mean 'deepspeed.zero_optimization.offload_optimizer.device'?",
        ),
        (
            {**DS, "scheduler": {"type": "WarmupLR", "parms": {}}},
            "did you mean 'deepspeed.scheduler.params'?",
        ),
        ({**DS, "bf16": {"enable": True}}, "did you mean 'deepspeed.bf16.enabled'?"),
        (
            {**DS, "frobnicate": 1},
            "unknown config key 'deepspeed.frobnicate': DeepSpeed 0.19.8 does not read it",
        ),
    ],
)
def test_deepspeed_keys_are_checked(deepspeed, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict({**BASE, "deepspeed": deepspeed}, "c.json")


def test_deepspeed_typo_from_the_command_line(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ValueError) as err:
        load_config(path, ["deepspeed.optimizr.params.lr=0.5"])
    assert str(err.value) == (
        "--set deepspeed.optimizr.params.lr=0.5: unknown config key 'deepspeed.optimizr'; "
        "did you mean 'deepspeed.optimizer'?"
    )
    # Free-form: the optimizer's params are its own; the legacy boolean ZeRO form is DeepSpeed's.
    cfg = load_config(
        path, ["deepspeed.optimizer.params.nesterov=true", "deepspeed.zero_optimization=false"]
    )
    assert cfg.deepspeed["optimizer"]["params"] == {"lr": 1.0, "nesterov": True}


def test_deepspeed_key_lists_match_the_installed_deepspeed():
    """The kept key lists against DeepSpeed itself: the top-level keys its config parser looks
    up (recorded while it parses a config), and the fields of the pydantic models it validates
    the strict sections with. On failure, copy the expected sets into deepspeed_keys.py."""
    import deepspeed
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime import constants
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    seen: set[str] = set()

    class Keys:
        def __init__(self, data):
            self.data = data

        def __contains__(self, key):
            seen.add(key)
            return dict.__contains__(self.data, key)

        def __iter__(self):
            return dict.__iter__(self.data)

    class Recording(dict):
        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(self)

    ds_config.DeepSpeedConfig(Recording({**DS, "train_micro_batch_size_per_gpu": 1}))
    removed = set(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    # The parser reads sequence_parallel_size only when a process group exists (other tests
    # may have made one in this process); deepspeed.initialize reads both keys anyway.
    reads, listed = seen - removed - INITIALIZE_KEYS, TOP_LEVEL_KEYS - INITIALIZE_KEYS
    assert reads == listed, (
        f"TOP_LEVEL_KEYS: add {sorted(reads - listed)}, drop {sorted(listed - reads)}"
    )
    source = inspect.getsource(deepspeed.initialize)
    assert all(f'"{key}"' in source for key in INITIALIZE_KEYS)

    models = {
        "zero_optimization": DeepSpeedZeroConfig,
        "zero_optimization.offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig,
        "zero_optimization.offload_param": DeepSpeedZeroOffloadParamConfig,
        "fp16": DeepSpeedFP16Config,
        "bf16": DeepSpeedBF16Config,
        "bfloat16": DeepSpeedBF16Config,
        "tensorboard": TensorBoardConfig,
        "csv_monitor": CSVConfig,
        "wandb": WandbConfig,
        "comet": CometConfig,
        "comms_logger": CommsLoggerConfig,
        "compile": CompileConfig,
    }
    expected = {
        "optimizer": {constants.TYPE, constants.OPTIMIZER_PARAMS, constants.LEGACY_FUSION},
        "scheduler": {constants.TYPE, constants.SCHEDULER_PARAMS},
    }
    for path, model in models.items():
        assert model.model_config.get("extra") == "forbid", path  # DeepSpeed is strict here
        expected[path] = {name for name in model.model_fields} | {
            f.alias for f in model.model_fields.values() if f.alias
        }
        # ... and the section really is parsed by that model: an unknown key fails there.
        section: dict = {"bogus_key": 1}
        for part in reversed(path.split(".")):
            section = {part: section}
        with pytest.raises(Exception, match="bogus_key"):
            ds_config.DeepSpeedConfig({**DS, "train_micro_batch_size_per_gpu": 1, **section})
    assert set(SECTION_KEYS) == set(expected)
    for path, keys in expected.items():
        listed = SECTION_KEYS[path]
        assert listed == keys, f"{path}: add {sorted(keys - listed)}, drop {sorted(listed - keys)}"


def printed_schema() -> dict:
    """What ``launch/train.py --print-config-schema`` prints; it must exit 0 without importing
    torch or DeepSpeed (it is for editors and validators, and must be quick)."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['launch/train.py', '--print-config-schema']\n"
        "try:\n"
        "    runpy.run_path('launch/train.py', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, f'exit status {stop.code}'\n"
        "heavy = [name for name in ('torch', 'deepspeed') if name in sys.modules]\n"
        "assert not heavy, f'--print-config-schema imported {heavy}'\n"
    )
    proc = run_script("-c", code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_printed_schema_accepts_the_shipped_configs_and_rejects_bad_ones():
    schema = printed_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    names = sorted((REPO / "configs").glob("*.json"))
    assert len(names) >= 3
    for name in names:
        error = jsonschema.exceptions.best_match(
            validator.iter_errors(json.loads(name.read_text()))
        )
        assert error is None, f"{name.name}: {error.message}"
    good = json.loads((REPO / "configs" / "demo.json").read_text())
    train, ds = good["train"], good["deepspeed"]
    bad = [
        {**good, "train": {**train, "lr_phy": 1.0}},
        {**good, "train": {**train, "max_steps": "300"}},
        {**good, "train": {**train, "max_steps": 0}},
        {**good, "store": {"codec": "lz4"}},
        {**good, "model": {"latent_widths": [8, 16.5]}},
        {key: value for key, value in good.items() if key != "run_dir"},
        {**good, "deepspeed": {**ds, "optimizr": {"type": "SGD"}}},
        {**good, "deepspeed": {**ds, "zero_optimization": {"stgae": 2}}},
    ]
    for config in bad:
        assert not validator.is_valid(config), config
        with pytest.raises(ValueError):  # the loader agrees
            config_from_dict(config)


def test_readme_config_reference_is_generated_from_the_schema():
    from lcm_dist.config.reference import COMMAND, readme_block, reference_markdown

    text = (REPO / "README.md").read_text()
    begin, end = readme_block(text)
    block = "".join(text.splitlines(keepends=True)[begin:end])
    assert block == reference_markdown(), f"README.md's config reference is stale; run {COMMAND}"
    assert len(block.splitlines()) <= 70


def test_every_key_has_a_description():
    from pydantic import BaseModel

    from lcm_dist.config import RunConfig

    def is_section(tp) -> bool:
        return not typing.get_origin(tp) and isinstance(tp, type) and issubclass(tp, BaseModel)

    sections = [RunConfig] + [
        f.annotation for f in RunConfig.model_fields.values() if is_section(f.annotation)
    ]
    assert len(sections) == 7
    for section in sections:
        for name, field in section.model_fields.items():
            if not is_section(field.annotation):
                assert field.description, f"{section.__name__}.{name} has no description"


def test_zero3_is_refused_with_the_reason(tmp_path):
    path = write(
        tmp_path, {**BASE, "deepspeed": {**BASE["deepspeed"], "zero_optimization": {"stage": 3}}}
    )
    with pytest.raises(
        ValueError, match=r"'deepspeed.zero_optimization.stage' is 3, which is not"
    ) as err:
        load_config(path)
    assert "fits on every GPU" in str(err.value) and "use stage 0, 1 or 2" in str(err.value)


def test_deepspeed_settings_chosen_for_this_model():
    from lcm_dist.train.setup import BUCKET_ELEMENTS, deepspeed_config

    cfg = load_config("configs/big.json")
    ds = deepspeed_config(cfg)
    zero = ds["zero_optimization"]
    # Buckets of ~1/4 of the paper generator, so reductions overlap the backward pass.
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == BUCKET_ELEMENTS
    assert BUCKET_ELEMENTS * 3 < 38_696_224 < BUCKET_ELEMENTS * 4
    # No clipping: no gradient-norm pass; bf16: no overflow check (theta and phi step together).
    assert zero["compute_grad_norm"] is False and ds["gradient_clipping"] == 0.0
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert "compute_grad_norm" not in cfg.deepspeed["zero_optimization"]  # the config as given
    # A config's own choices win, and clipping keeps the norm DeepSpeed clips by.
    raw = json.loads(Path("configs/big.json").read_text())
    raw["deepspeed"]["gradient_clipping"] = 1.0
    raw["deepspeed"]["bf16"]["check_grad_overflow"] = True
    raw["deepspeed"]["zero_optimization"]["reduce_bucket_size"] = 123
    ds = deepspeed_config(config_from_dict(raw))
    assert "compute_grad_norm" not in ds["zero_optimization"]
    assert ds["bf16"]["check_grad_overflow"] is True
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    # ZeRO stage 0 has no buckets to set.
    paper = deepspeed_config(load_config("configs/paper.json"))
    assert paper["zero_optimization"] == {"stage": 0}
