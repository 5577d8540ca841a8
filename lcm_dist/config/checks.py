"""Checks of the run config that involve several keys, with messages that say what to do.

Single-key bounds (``train.max_steps >= 1``) are constraints of the schema's fields; what is
here runs once a section's keys have their types: the model's layers must fit together, the
log's preview must have images, and the ``deepspeed`` section must suit this trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lcm_dist.config.deepspeed_keys import check_section_keys, check_top_level_keys

if TYPE_CHECKING:
    from lcm_dist.config.schema import ModelConfig, RunConfig


def apply_model_preset(
    model: Any, presets: dict[str, dict[str, Any]], default: str
) -> dict[str, Any] | Any:
    """Fill a ``model`` section from its preset; keys the user gave win."""
    if not isinstance(model, dict):
        return model  # not an object: the schema reports it
    preset = model.get("preset", default)
    if not isinstance(preset, str) or preset not in presets:
        raise ValueError(
            f"config key 'model.preset' is {preset!r}; choose one of {', '.join(presets)}"
        )
    return {**presets[preset], **model, "preset": preset}


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


def validate(cfg: RunConfig) -> None:
    """Checks across the sections of a run config whose sections are each valid."""
    d, lg = cfg.data, cfg.log
    if not cfg.run_dir:
        raise ValueError("config key 'run_dir' must name a directory for the run's outputs")
    if not d.shards:
        raise ValueError(
            "config key 'data.shards' must name the shards folder (make_shards.py --out)"
        )
    if lg.restore_every_steps and not lg.restore_images:
        raise ValueError(
            "config key 'log.restore_every_steps' is set but 'log.restore_images' names no "
            "held-back images"
        )
    ds = cfg.deepspeed
    if lg.restore_every_steps and any(
        isinstance(ds.get(k), dict) and ds[k].get("enabled") for k in ("fp16", "bf16")
    ):
        raise ValueError(
            "config key 'log.restore_every_steps' needs the fp32 generator; it cannot be used "
            "with deepspeed.fp16 or deepspeed.bf16 (restore from an export instead)"
        )
    validate_deepspeed(ds, d.batch_size)


def validate_deepspeed(ds: dict[str, Any], batch_size: int) -> None:
    """The ``deepspeed`` section: keys DeepSpeed knows, and settings this trainer supports."""
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
    check_top_level_keys(ds)
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
    check_section_keys(ds)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("stage") == 3:
        raise ValueError(
            "config key 'deepspeed.zero_optimization.stage' is 3, which is not supported: the "
            "generator (155 MB in fp32 for the paper model) fits on every GPU, and ZeRO-3 would "
            "all-gather and reduce-scatter all of it in every inner step; use stage 0, 1 or 2"
        )
    if not isinstance(opt.get("params", {}), dict):
        raise ValueError("config key 'deepspeed.optimizer.params' must be an object")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != batch_size:
        raise ValueError(
            f"config key 'deepspeed.train_micro_batch_size_per_gpu' ({micro}) differs from "
            f"'data.batch_size' ({batch_size}); drop it or make them equal"
        )
    if ds.get("gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            "config key 'deepspeed.gradient_accumulation_steps' must be 1: each inner step of "
            "a batch is a full optimizer step"
        )
