"""The run config's schema: one strict, frozen pydantic model per section.

Unknown keys are errors, and so are values of the wrong type (a string is never read as a
number; an integer is accepted where a float is expected). Each field's one-line description,
with its unit, is the documentation of the key: the README's config reference and the JSON
Schema (``python launch/train.py --print-config-schema``) are generated from it. Checks that
involve several keys live in ``checks.py`` and run when a model is built.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from lcm_dist.config import checks
from lcm_dist.config.deepspeed_keys import deepspeed_json_schema

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
DEFAULT_PRESET = "demo32"

PresetName = Literal[tuple(MODEL_PRESETS)]
# A list of channel counts; JSON has no tuples, so a list is accepted (items stay strict ints).
Widths = tuple[StrictInt, ...]


def _widths(default: tuple[int, ...], description: str) -> Any:
    return Field(default, strict=False, description=description)


class Section(BaseModel):
    """A config section: unknown keys and loosely typed values are errors; frozen once built."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ModelConfig(Section):
    """Latent nets f_phi and generator g_theta; the keys a preset sets default from it."""

    preset: PresetName = Field(
        DEFAULT_PRESET,
        description="Architecture preset that sets image_size, noise_size and the generator "
        "widths unless given: paper (128 px), demo64, demo32 (plumbing tests only)",
    )
    image_size: StrictInt = Field(32, description="Side of the square training images, in px")
    image_channels: StrictInt = Field(3, description="Colour channels of the images (3 = RGB)")
    noise_channels: StrictInt = Field(
        2, description="Channels of the fixed noise input s shared by all latent nets"
    )
    noise_size: StrictInt = Field(
        16, description="Side of s in px; z's side is noise_size - 2 * len(latent_widths)"
    )
    noise_scale: float = Field(0.1, gt=0, description="s is uniform noise in [0, noise_scale)")
    noise_seed: StrictInt = Field(
        42, description="Seed of the fixed noise input s (the authors' 42)"
    )
    latent_widths: Widths = _widths(
        (8, 16, 32, 64),
        "Output channels of the latent net's 3x3 valid convs; the last is z's channel count",
    )
    leaky_slope: float = Field(0.2, description="Negative slope of the latent net's LeakyReLU")
    clamp: float = Field(
        0.01, gt=0, description="phi's conv weights are clamped to [-clamp, clamp] after each step"
    )
    phi_init_seed: StrictInt = Field(
        42,
        description="Seed of the PyTorch default conv init that gives every image's first phi (the "
        "authors' 42)",
    )
    gen_encoder_widths: Widths = _widths(
        (64, 128, 256),
        "Channels of the generator's three 4x4 stride-2 convs; the last must be even",
    )
    gen_decoder_widths: Widths = _widths(
        (128, 128, 64, 32), "Channels of the generator's four 4x4 stride-2 transposed convs"
    )
    gen_head_widths: Widths = _widths(
        (16, 8), "Channels of the generator's two 3x3 convs after the bilinear x2 upsampling"
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        return checks.apply_model_preset(data, MODEL_PRESETS, DEFAULT_PRESET)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        checks.validate_model(self)
        return self


class DataConfig(Section):
    """Where the training images come from and how they are batched."""

    shards: str = Field(
        "", description="Folder with the WebDataset shards and manifest.json (required)"
    )
    batch_size: StrictInt = Field(10, ge=1, description="Images per batch on each process")
    num_workers: StrictInt = Field(
        2, ge=0, description="DataLoader worker processes per training process"
    )
    shuffle_buffer: StrictInt = Field(
        100, ge=0, description="Samples per shuffle block of each loader worker (0, 1: shard order)"
    )


class TrainConfig(Section):
    """The optimisation schedule."""

    max_steps: StrictInt = Field(
        ge=1, description="Batches to train on, each with inner_steps joint updates"
    )
    inner_steps: StrictInt = Field(
        50, ge=1, description="Joint SGD updates of phi and theta per batch (paper: 50)"
    )
    lr_phi: float = Field(
        1.0, gt=0, description="SGD learning rate of phi (theta's is in deepspeed.optimizer)"
    )
    lap_levels: StrictInt = Field(
        4,
        ge=1,
        description="Lap-L1 terms: lap_levels - 1 bands and the low-pass residual (4: the authors' "
        "max_levels=3)",
    )
    mse_weight: float = Field(1.0, ge=0, description="Weight of the MSE term next to Lap-L1")
    seed: StrictInt = Field(0, description="Seed of the data order and all other random streams")
    deterministic: bool = Field(
        False, description="Deterministic torch kernels (bitwise on CPUs, best effort on GPUs)"
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="Layout of the generator's activations: auto = channels_last on GPUs (faster "
        "convolutions there, docs/benchmarks.md), contiguous on CPUs",
    )
    cudnn_benchmark: bool = Field(
        False,
        description="Let cuDNN time its convolution algorithms at the start and keep the fastest "
        "(GPUs; off under train.deterministic)",
    )
    grow_from: str = Field(
        "",
        description="A trained run folder to grow: a new run_dir starts from its newest commit "
        "(generator, optimizer state, step, the phi of its images) on shards whose first rows "
        "are that run's images in order",
    )
    new_rows_from: str = Field(
        "",
        description="With grow_from: a launch/fit.py output (folder or URL) with the new "
        "images' fitted phi, matched by key; empty: the new rows start from the default init",
    )


class StoreConfig(Section):
    """Where the per-image phi vectors live and how they are paged through memory."""

    url: str = Field(
        "", description="Zarr v3 latent store: path or fsspec URL; empty: <run_dir>/latents.zarr"
    )
    rows_per_chunk: StrictInt = Field(
        0, ge=0, description="Images per Zarr chunk, dividing the shard size (0: chunks <= 8 MB)"
    )
    codec: Literal["none", "zstd", "blosc"] = Field(
        "none", description="Chunk compression (phi compresses little; compression costs CPU)"
    )
    codec_level: StrictInt = Field(1, description="Compression level of zstd or blosc")
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage dtype of phi (computation is always float32)"
    )
    cache_bytes: StrictInt = Field(
        1 << 30, ge=1, description="Write-back cache budget per process, in bytes (2^30 = 1 GiB)"
    )
    io_threads: StrictInt = Field(
        2, ge=1, description="Background threads that prefetch and write back chunks"
    )
    prefetch_chunks: StrictInt = Field(
        64, ge=0, description="How many chunks ahead the cache may read, budget permitting"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options, e.g. endpoint_url, key, secret for s3 (default timeouts: 5 s "
        "connect, 15 s read)",
    )
    retries: StrictInt = Field(
        10,
        ge=0,
        description="Retries of a store operation that fails transiently (waits double from 0.5 s "
        "to 20 s; 0: none)",
    )
    retry_seconds: float = Field(
        120.0,
        ge=0,
        description="Time after which a store operation that keeps failing stops the run, in s",
    )
    stall_warning_seconds: float = Field(
        30.0,
        ge=0,
        description="Warn when a step has waited this many s for the store, and every as many s "
        "after (0: never)",
    )
    in_ram: bool = Field(
        False, description="All latents in RAM, no store, nothing saved (small data, benchmarks)"
    )


class CheckpointConfig(Section):
    """When the run commits a checkpoint (re-running the same command resumes from the last)."""

    every_steps: StrictInt = Field(
        1000, ge=0, description="Commit a checkpoint every this many batches (0: only at the end)"
    )
    keep_latest: StrictInt = Field(
        2, ge=1, description="Committed checkpoints kept; older ones are deleted after a commit"
    )


class LogConfig(Section):
    """What the run reports and how often."""

    every_steps: StrictInt = Field(
        10, ge=1, description="Scalars to TensorBoard every this many batches"
    )
    image_every_steps: StrictInt = Field(
        100, ge=0, description="Target/reconstruction grid every this many batches (0: never)"
    )
    progress: bool = Field(True, description="Progress bar with ETA on rank 0")
    restore_every_steps: StrictInt = Field(
        0, ge=0, description="Inpaint restore_images every this many batches (0: never)"
    )
    restore_images: str = Field(
        "", description="Held-back images never trained on: one file, folder or glob"
    )
    restore_iterations: StrictInt = Field(
        100, ge=1, description="SGD iterations (lr 0.5) of the fresh phi of each held-back image"
    )
    trace_rows: bool = Field(
        False,
        description="Audit the data plan: each process's rows per batch and final generator "
        "checksum to <run_dir>/trace/rows-rank<R>.jsonl",
    )
    accelerator_tflops: float = Field(
        0.0, ge=0, description="Peak dense TFLOP/s of one GPU, for the perf/mfu scalar (0: none)"
    )


class RunConfig(Section):
    """A whole run: the project's sections plus DeepSpeed's own config, verbatim."""

    run_dir: str = Field(
        description="Folder of the run: TensorBoard logs (tb/), checkpoints and the resolved config"
    )
    train: TrainConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed's config (optimizer required, ZeRO, precision, ...), passed "
        "verbatim to deepspeed.initialize; unknown keys are errors",
        json_schema_extra=deepspeed_json_schema(),
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        checks.validate(self)
        return self


def bottleneck_side(m: ModelConfig) -> int:
    """Side of the generator's innermost feature maps (z's side / 8): 4 for ``paper``, 2 for
    ``demo64``, 1 for ``demo32``. At 1 every BatchNorm there normalises a channel over the batch
    alone, and a batch of fresh latents (all images start from the same phi) has zero variance:
    phi's first gradient is ~1e7 times too large, the latents blow up and stop learning."""
    return (m.noise_size - 2 * len(m.latent_widths)) // 8


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a run config file."""
    return RunConfig.model_json_schema()


def print_config_schema() -> None:
    """Print the JSON Schema of a run config file (for editors and validators)."""
    print(json.dumps(config_json_schema(), indent=2))
