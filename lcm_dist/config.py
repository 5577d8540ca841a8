"""Run configuration: one JSON file per run, loaded strictly into frozen dataclasses.

The file holds the project's own sections (``model``, ``data``, ``train``, ``log``) plus a
``deepspeed`` section that is handed verbatim to ``deepspeed.initialize``. Unknown keys,
duplicate keys and values of the wrong type are errors that name their dotted path, so a typo
never silently falls back to a default. Command-line overrides (``--set train.lr_phi=0.5``) go
through the same loader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Model presets. ``paper`` is the authors' model at 128x128 (REFERENCE: s 40x40, z 64x32x32,
# EncDecCelebA). The CPU presets keep every layer of it, the latent nets unchanged
# (P = 24,448 per image), with a smaller noise input and latent grid and a narrower generator.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 128,
        "noise_size": 40,
        "gen_encoder_widths": [256, 512, 1024],
        "gen_decoder_widths": [512, 512, 256, 128],
        "gen_head_widths": [64, 32],
    },
    "demo64": {
        "image_size": 64,
        "noise_size": 24,
        "gen_encoder_widths": [64, 128, 256],
        "gen_decoder_widths": [128, 128, 64, 32],
        "gen_head_widths": [16, 8],
    },
    "demo32": {
        "image_size": 32,
        "noise_size": 16,
        "gen_encoder_widths": [64, 128, 256],
        "gen_decoder_widths": [128, 128, 64, 32],
        "gen_head_widths": [16, 8],
    },
}


@dataclass(frozen=True)
class ModelConfig:
    """Latent nets f_phi and generator g_theta. Unset fields come from ``preset``."""

    preset: str = "demo32"
    """Name of the architecture preset the other fields default from (paper, demo64, demo32)."""
    image_size: int = 32
    """Side of the square training images, in pixels."""
    image_channels: int = 3
    """Colour channels of the images (3 = RGB)."""
    noise_channels: int = 2
    """Channels of the fixed noise input s shared by all latent nets."""
    noise_size: int = 16
    """Side of the fixed noise input s, in pixels; z has side noise_size - 2 * len(latent_widths)."""
    noise_scale: float = 0.1
    """s is uniform noise in [0, noise_scale)."""
    noise_seed: int = 42
    """Seed of the fixed noise input s (the authors' 42)."""
    latent_widths: tuple[int, ...] = (8, 16, 32, 64)
    """Output channels of each 3x3 valid conv of the latent net; the last is z's channel count."""
    leaky_slope: float = 0.2
    """Negative slope of the latent net's LeakyReLU."""
    clamp: float = 0.01
    """Conv weights of every phi are clamped to [-clamp, clamp] after each step."""
    phi_init_seed: int = 42
    """Seed under which the latent net is built with PyTorch's default conv init; the result is
    the phi every image starts from (the authors' 42)."""
    gen_encoder_widths: tuple[int, ...] = (64, 128, 256)
    """Channels of the generator's three 4x4 stride-2 convs; the last is also the width of the
    three dilated grouped convs and must be even (two channels per group)."""
    gen_decoder_widths: tuple[int, ...] = (128, 128, 64, 32)
    """Channels of the generator's four 4x4 stride-2 transposed convs."""
    gen_head_widths: tuple[int, ...] = (16, 8)
    """Channels of the generator's two 3x3 convs after the bilinear x2 upsampling."""


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how they are batched."""

    shards: str = ""
    """Directory with WebDataset shards and manifest.json (from launch/make_shards.py)."""
    batch_size: int = 10
    """Images per batch on each process."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    shuffle_buffer: int = 100
    """Samples per shuffle block of each loader worker's stream (0 or 1 = shard order)."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation schedule."""

    max_steps: int
    """Batches to train on (each gets inner_steps joint SGD updates); required."""
    inner_steps: int = 50
    """Joint SGD updates of phi and theta per batch (the paper uses 50)."""
    lr_phi: float = 1.0
    """Learning rate of the per-image latent nets phi (plain SGD)."""
    lap_levels: int = 4
    """Terms of the Laplacian pyramid in the Lap-L1 loss: lap_levels - 1 band-pass images and the
    low-pass residual (the authors' max_levels=3 is 4)."""
    mse_weight: float = 1.0
    """Weight of the MSE loss term next to Lap-L1."""
    seed: int = 0
    """Seed of the data order and every other random stream of the run."""
    deterministic: bool = False
    """Use deterministic torch kernels (slower; bitwise reproducible on CPUs, best effort on
    GPUs, where bilinear upsampling's backward has no deterministic kernel)."""


@dataclass(frozen=True)
class StoreConfig:
    """Where the per-image phi vectors live and how they are paged through memory."""

    url: str = ""
    """Zarr v3 latent store: a local path or any fsspec URL (s3://..., memory://...);
    empty = <run_dir>/latents.zarr."""
    rows_per_chunk: int = 0
    """Rows (images) per Zarr chunk; must divide the shards' samples_per_shard. 0 = the largest
    divisor of samples_per_shard whose chunk is at most 8 MB."""
    codec: str = "none"
    """Chunk compression: none, zstd or blosc (phi compresses little; compression costs CPU)."""
    codec_level: int = 1
    """Compression level of zstd or blosc."""
    dtype: str = "float32"
    """Storage dtype of phi: float32 or float16 (computation is always float32)."""
    cache_bytes: int = 1 << 30
    """Memory budget of the write-back cache, in bytes per process."""
    io_threads: int = 2
    """Background threads that prefetch and write back chunks."""
    prefetch_chunks: int = 64
    """How many chunks ahead of the current position the cache may read (budget permitting)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for the store URL (e.g. endpoint_url, key, secret for s3). For s3://,
    config_kwargs defaults to 5 s connect and 15 s read timeouts and no botocore retries."""
    retries: int = 10
    """Retries of a store read or write that failed with a transient error (lost or refused
    connection, timeout, HTTP 5xx, throttling); waits double from 0.5 s up to 20 s; 0 = none."""
    retry_seconds: float = 120.0
    """Seconds after which a store operation that keeps failing stops retrying and the run
    stops with an error (it resumes from its last checkpoint); opening a store: at most 15 s."""
    stall_warning_seconds: float = 30.0
    """Warn on stderr when a step has waited this many seconds for the store, and again every
    as many seconds while it waits; 0 = never."""
    in_ram: bool = False
    """Keep all latents in RAM instead (no store, nothing saved): small datasets, benchmarks."""


@dataclass(frozen=True)
class CheckpointConfig:
    """When the run commits a checkpoint (re-running the same command resumes from the last)."""

    every_steps: int = 1000
    """Commit a checkpoint every this many batches (0 = only at the end of the run)."""
    keep_latest: int = 2
    """How many committed checkpoints to keep (older ones are deleted after a commit)."""


@dataclass(frozen=True)
class LogConfig:
    """What the run reports and how often."""

    every_steps: int = 10
    """Write scalars to TensorBoard every this many batches."""
    image_every_steps: int = 100
    """Write a target-vs-reconstruction image grid every this many batches (0 = never)."""
    progress: bool = True
    """Show a progress bar with ETA on rank 0."""
    restore_every_steps: int = 0
    """Every this many batches, inpaint held-back images with the current generator and show
    them in TensorBoard (0 = never; needs restore_images)."""
    restore_images: str = ""
    """Held-back images (one file, folder or glob) for restore_every_steps: never trained on."""
    restore_iterations: int = 100
    """Iterations of the fresh phi fitted to each held-back image (SGD at lr 0.5, the
    inpainting default of launch/restore.py)."""
    trace_rows: bool = False
    """Audit the data plan: every process writes the rows of each batch it trains, and a
    checksum of its generator at the end, to <run_dir>/trace/rows-rank<R>.jsonl."""
    accelerator_tflops: float = 0.0
    """Peak dense TFLOP/s of one GPU in the training precision, for the model FLOP utilisation
    scalar perf/mfu (0: not reported)."""


@dataclass(frozen=True)
class RunConfig:
    """A whole run: the project's sections plus DeepSpeed's own config, verbatim."""

    run_dir: str
    """Directory for TensorBoard logs, the resolved config and checkpoints."""
    train: TrainConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: dict = field(default_factory=dict)
    """Passed verbatim to deepspeed.initialize (optimizer, ZeRO stage, precision, ...)."""


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs so duplicates can be reported with a path."""


def _pairs_to_dict(value: Any, path: str) -> Any:
    if isinstance(value, _Pairs):
        out: dict[str, Any] = {}
        for key, item in value:
            dotted = f"{path}.{key}" if path else key
            if key in out:
                raise ValueError(f"duplicate config key '{dotted}'; keep only one of them")
            out[key] = _pairs_to_dict(item, dotted)
        return out
    if isinstance(value, list):
        return [_pairs_to_dict(item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def parse_json_text(text: str, source: str) -> dict[str, Any]:
    """Parse a JSON config text, rejecting duplicate keys with their dotted path."""
    try:
        raw = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{source} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    data = _pairs_to_dict(raw, "")
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object at the top level")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key '{path}' must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{path}' must be an object, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{path}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{path}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"config key '{path}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"config key '{path}' must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{path}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} at {path}")  # programming error


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a dict, strictly: unknown keys and wrong types are errors."""
    where = f"config section '{path}'" if path else "the config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = f"{path}.{key}" if path else key
            raise ValueError(
                f"unknown config key '{dotted}'; valid keys here are: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing required config key '{dotted}'")
            continue
        kwargs[name] = _coerce(hints[name], data[name], dotted)
    return cls(**kwargs)


def _apply_model_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill the model section from its preset; keys the user gave win."""
    model = raw.get("model", {})
    if not isinstance(model, dict):
        return raw
    preset = model.get("preset", ModelConfig.preset)
    if preset not in MODEL_PRESETS:
        raise ValueError(
            f"config key 'model.preset' is {preset!r}; choose one of {', '.join(MODEL_PRESETS)}"
        )
    return {**raw, "model": {**MODEL_PRESETS[preset], **model, "preset": preset}}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a JSON value (bare words are strings)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (or run_dir=value)")
    key, value_text = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r} has an empty key; use section.key=value")
    try:
        value = json.loads(value_text)
    except json.JSONDecodeError:
        value = value_text
    return parts, value


def add_override_argument(parser) -> None:
    """The command-line ``--set section.key=value`` option (repeatable) into ``args.overrides``,
    for ``load_config``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=100 (repeatable)",
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config dict with ``--set`` overrides applied."""
    raw = json.loads(json.dumps(raw))
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(parts[: i + 1])
                raise ValueError(f"override {text!r}: config key '{dotted}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def bottleneck_side(m: ModelConfig) -> int:
    """Side of the generator's innermost feature maps (z's side / 8): 4 for ``paper``, 2 for
    ``demo64``, 1 for ``demo32``. At 1 every BatchNorm there normalises a channel over the batch
    alone, and a batch of fresh latents (all images start from the same phi) has zero variance:
    phi's first gradient is ~1e7 times too large, the latents blow up and stop learning."""
    return (m.noise_size - 2 * len(m.latent_widths)) // 8


def validate_model(m: ModelConfig) -> None:
    """Checks that the latent nets and the generator of a model config fit together."""
    if not m.latent_widths or min(m.latent_widths) <= 0:
        raise ValueError("config key 'model.latent_widths' must list positive channel counts")
    z_size = m.noise_size - 2 * len(m.latent_widths)
    if z_size < 1:
        raise ValueError(
            f"config key 'model.noise_size' ({m.noise_size}) is too small for "
            f"{len(m.latent_widths)} valid 3x3 convs; raise it"
        )
    for key, count in (
        ("gen_encoder_widths", 3),
        ("gen_decoder_widths", 4),
        ("gen_head_widths", 2),
    ):
        widths = getattr(m, key)
        if len(widths) != count or min(widths) <= 0:
            raise ValueError(f"config key 'model.{key}' must list {count} positive channel counts")
    if m.gen_encoder_widths[-1] % 2:
        raise ValueError(
            "config key 'model.gen_encoder_widths' must end in an even width (the dilated convs "
            "have two channels per group)"
        )
    if z_size % 8 != 0:
        raise ValueError(
            f"the latent grid side {z_size} (model.noise_size - 2 * len(model.latent_widths)) must "
            "be divisible by 8 (the generator halves it three times)"
        )
    if m.image_size != 4 * z_size:
        raise ValueError(
            f"config key 'model.image_size' ({m.image_size}) must be 4 times the latent grid side "
            f"{z_size}, i.e. {4 * z_size}"
        )
    if m.clamp <= 0 or m.noise_scale <= 0:
        raise ValueError("config keys 'model.clamp' and 'model.noise_scale' must be positive")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks, in one place, with messages that say what to do."""
    m, t, d, lg = cfg.model, cfg.train, cfg.data, cfg.log
    if not cfg.run_dir:
        raise ValueError("config key 'run_dir' must name a directory for the run's outputs")
    if not d.shards:
        raise ValueError(
            "config key 'data.shards' must name the shards folder (make_shards.py --out)"
        )
    if t.max_steps <= 0:
        raise ValueError("config key 'train.max_steps' must be a positive number of batches")
    if t.inner_steps <= 0:
        raise ValueError("config key 'train.inner_steps' must be at least 1")
    if t.lr_phi <= 0:
        raise ValueError("config key 'train.lr_phi' must be positive")
    if t.lap_levels < 1:
        raise ValueError("config key 'train.lap_levels' must be at least 1")
    if t.mse_weight < 0:
        raise ValueError("config key 'train.mse_weight' must be >= 0")
    if d.batch_size <= 0:
        raise ValueError("config key 'data.batch_size' must be positive")
    if d.num_workers < 0 or d.shuffle_buffer < 0:
        raise ValueError("config keys 'data.num_workers' and 'data.shuffle_buffer' must be >= 0")
    if lg.every_steps <= 0 or lg.image_every_steps < 0:
        raise ValueError(
            "config key 'log.every_steps' must be >= 1 and 'log.image_every_steps' >= 0"
        )
    if lg.accelerator_tflops < 0:
        raise ValueError(
            f"config key 'log.accelerator_tflops' is {lg.accelerator_tflops}; it must be >= 0"
        )
    if lg.restore_every_steps < 0 or lg.restore_iterations < 1:
        raise ValueError(
            "config key 'log.restore_every_steps' must be >= 0 and 'log.restore_iterations' >= 1"
        )
    if lg.restore_every_steps and not lg.restore_images:
        raise ValueError(
            "config key 'log.restore_every_steps' is set but 'log.restore_images' names no "
            "held-back images"
        )
    if lg.restore_every_steps and any(
        cfg.deepspeed.get(k, {}).get("enabled") for k in ("fp16", "bf16")
    ):
        raise ValueError(
            "config key 'log.restore_every_steps' needs the fp32 generator; it cannot be used "
            "with deepspeed.fp16 or deepspeed.bf16 (restore from an export instead)"
        )
    if lg.restore_every_steps and cfg.deepspeed.get("zero_optimization", {}).get("stage") == 3:
        raise ValueError(
            "config key 'log.restore_every_steps' needs the whole generator on rank 0; ZeRO "
            "stage 3 partitions it (use stage 0-2, or restore from an export)"
        )
    validate_model(m)
    if cfg.checkpoint.every_steps < 0:
        raise ValueError(
            f"config key 'checkpoint.every_steps' is {cfg.checkpoint.every_steps}; it must be >= 0"
        )
    if cfg.checkpoint.keep_latest < 1:
        raise ValueError(
            f"config key 'checkpoint.keep_latest' is {cfg.checkpoint.keep_latest}; it must be >= 1"
        )
    st = cfg.store
    if st.rows_per_chunk < 0:
        raise ValueError("config key 'store.rows_per_chunk' must be >= 0 (0 = automatic)")
    if st.codec not in ("none", "zstd", "blosc"):
        raise ValueError(f"config key 'store.codec' is {st.codec!r}; use none, zstd or blosc")
    if st.dtype not in ("float32", "float16"):
        raise ValueError(f"config key 'store.dtype' is {st.dtype!r}; use float32 or float16")
    if st.retries < 0 or st.retry_seconds < 0 or st.stall_warning_seconds < 0:
        raise ValueError(
            "config keys 'store.retries', 'store.retry_seconds' and "
            "'store.stall_warning_seconds' must be >= 0"
        )
    if st.cache_bytes <= 0 or st.io_threads <= 0 or st.prefetch_chunks < 0:
        raise ValueError(
            "config keys 'store.cache_bytes' and 'store.io_threads' must be positive and "
            "'store.prefetch_chunks' >= 0"
        )
    ds = cfg.deepspeed
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled"):
        raise ValueError(
            "config key 'deepspeed.fp16.enabled' is true, but fp16 is not supported: DeepSpeed "
            "scales the loss, so phi's gradient would be scaled too and phi stepped on steps "
            "it skips for overflow; use deepspeed.bf16 (same speed on current GPUs) or fp32"
        )
    amp = ds.get("amp")
    if isinstance(amp, dict) and amp.get("enabled"):
        raise ValueError(
            "config key 'deepspeed.amp.enabled' is true, but apex AMP is not supported; use "
            "deepspeed.bf16"
        )
    if "optimizer" not in ds:
        raise ValueError(
            "config key 'deepspeed.optimizer' is missing; the generator's optimizer is set there, "
            'e.g. {"type": "SGD", "params": {"lr": 1.0}}'
        )
    opt = ds["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise ValueError(
            "config key 'deepspeed.optimizer' must name the optimizer's type, "
            'e.g. {"type": "SGD", "params": {"lr": 1.0}}'
        )
    unknown = sorted(set(opt) - {"type", "params", "legacy_fusion"})
    if unknown:
        raise ValueError(
            f"unknown config key 'deepspeed.optimizer.{unknown[0]}'; valid keys here are: "
            "legacy_fusion, params, type"
        )
    if not isinstance(opt.get("params", {}), dict):
        raise ValueError("config key 'deepspeed.optimizer.params' must be an object")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != d.batch_size:
        raise ValueError(
            f"config key 'deepspeed.train_micro_batch_size_per_gpu' ({micro}) differs from "
            f"'data.batch_size' ({d.batch_size}); drop it or make them equal"
        )
    if ds.get("gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            "config key 'deepspeed.gradient_accumulation_steps' must be 1: each inner step of "
            "a batch is a full optimizer step"
        )


def config_from_dict(raw: dict[str, Any], source: str = "the config") -> RunConfig:
    """Build and validate a RunConfig from a parsed JSON dict."""
    try:
        raw = _apply_model_preset(raw)
        cfg = _build(RunConfig, raw, "")
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    try:
        validate(cfg)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return cfg


def model_from_dict(raw: dict[str, Any], source: str = "the model config") -> ModelConfig:
    """A ModelConfig from a ``model`` section (e.g. one saved in a checkpoint or an export)."""
    try:
        model = _build(ModelConfig, _apply_model_preset({"model": raw})["model"], "model")
        validate_model(model)
        return model
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def parse_options(text: str, flag: str) -> dict:
    """A command-line option that holds a JSON object (e.g. fsspec storage options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object such as '{{\"anon\": true}}'")
    return value


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config file, apply ``--set`` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    raw = parse_json_text(text, str(path))
    overrides = overrides or []
    try:
        return config_from_dict(apply_overrides(raw, overrides), str(path))
    except ValueError:
        if not overrides:
            raise
        config_from_dict(raw, str(path))  # a fault of the file itself is reported as such
        # The file is fine: blame the first --set after which the config no longer is.
        for i, text in enumerate(overrides):
            config_from_dict(apply_overrides(raw, overrides[: i + 1]), f"--set {text}")
        raise


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def write_resolved_config(cfg: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Write the fully resolved config next to the run, atomically."""
    out = Path(run_dir) / "config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    os.replace(tmp, out)
    return out
