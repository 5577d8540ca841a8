"""The keys DeepSpeed reads from its config, so a typo in the ``deepspeed`` section is an error.

DeepSpeed ignores top-level keys it does not know, so ``"optimizr"`` would be saved with the run
and silently do nothing. The lists below are DeepSpeed 0.19.8's: ``TOP_LEVEL_KEYS`` are the keys
``deepspeed.runtime.config.DeepSpeedConfig`` reads (without those it rejects as removed
features) plus the two ``deepspeed.initialize`` reads; ``SECTION_KEYS`` are the fields and
aliases of the pydantic models DeepSpeed validates those sections with (``DeepSpeedZeroConfig``,
``DeepSpeedBF16Config``, ...) and the keys of ``optimizer`` and ``scheduler`` (whose ``params``
are free-form, per optimizer). They are kept here rather than read from DeepSpeed because
importing it takes seconds; tests/test_config.py derives them from the installed DeepSpeed and
fails when they drift.
"""

from __future__ import annotations

import difflib
from typing import Any

DEEPSPEED_VERSION = "0.19.8"
DOCS = "https://www.deepspeed.ai/docs/config-json/"

TOP_LEVEL_KEYS = frozenset(
    """
    activation_checkpointing aio autotuning bf16 bfloat16 checkpoint comet comms_logger
    communication_data_type compile csv_monitor data_efficiency data_parallel_size data_types
    dataloader_drop_last datastates_ckpt disable_allgather disable_python_gc dump_state
    expert_parallel flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op
    gradient_clipping gradient_predivide_factor hybrid_engine log_level
    managed_gradient_accumulation memory_breakdown optimizer pipeline prescale_gradients scheduler
    seq_parallel_communication_data_type sequence_parallel_size steps_per_print tensor_parallel
    tensorboard timers torch_autocast train_batch_size train_micro_batch_size_per_gpu
    use_data_before_expert_parallelism vocabulary_size wall_clock_breakdown wandb
    weight_quantization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
    zero_optimization
    """.split()
)

# Keys read by deepspeed.initialize itself rather than by DeepSpeedConfig.
INITIALIZE_KEYS = frozenset({"data_parallel_size", "sequence_parallel_size"})

_BF16 = "bf16_master_weights_and_grads bf16_optimizer_states check_grad_overflow enabled "
_BF16 += "immediate_grad_update"
_MONITOR = "enabled job_name output_path"

SECTION_KEYS: dict[str, frozenset[str]] = {
    name: frozenset(keys.split())
    for name, keys in {
        "zero_optimization": """
            allgather_bucket_size allgather_partitions allgather_sequential compute_grad_norm
            contiguous_gradients cpu_offload cpu_offload_param cpu_offload_use_pin_memory
            elastic_checkpoint enable_sanity_checks gather_16bit_weights_on_model_save
            ignore_unused_parameters leaf_module legacy_stage1 load_from_fp32_weights
            log_trace_cache_warnings max_live_parameters max_reuse_distance
            memory_efficient_linear model_persistence_threshold module_granularity_threshold
            offload_optimizer offload_param overlap_comm override_module_apply
            param_persistence_threshold parameter_alignment pipeline_loading_checkpoint
            prefetch_bucket_size reduce_bucket_size reduce_scatter round_robin_gradients
            save_muon_momentum_buffer_in_memory stage stage3_allgather_sequential
            stage3_gather_16bit_weights_on_model_save stage3_gather_fp16_weights_on_model_save
            stage3_max_live_parameters stage3_max_reuse_distance
            stage3_model_persistence_threshold stage3_module_granularity_threshold
            stage3_param_persistence_threshold stage3_prefetch_bucket_size
            stage3_use_all_reduce_for_fetch_params sub_group_size use_all_reduce_for_fetch_params
            use_multi_rank_bucket_allreduce zenflow zero_hpz_partition_size
            zero_quantized_gradients zero_quantized_nontrainable_weights zero_quantized_weights
            """,
        "zero_optimization.offload_optimizer": """
            buffer_count cpuadam_cores_perc device fast_init nvme_path pin_memory pipeline_read
            pipeline_write ratio super_offload
            """,
        "zero_optimization.offload_param": """
            buffer_count buffer_size device max_in_cpu nvme_path pin_memory
            """,
        "fp16": """
            auto_cast consecutive_hysteresis enabled fp16_master_weights_and_grads hysteresis
            initial_scale_power loss_scale loss_scale_window min_loss_scale
            """,
        "bf16": _BF16,
        "bfloat16": _BF16,
        "optimizer": "legacy_fusion params type",
        "scheduler": "params type",
        "tensorboard": _MONITOR,
        "csv_monitor": _MONITOR,
        "wandb": "enabled group project team",
        "comet": """
            api_key enabled experiment_key experiment_name mode online project
            samples_log_interval workspace
            """,
        "comms_logger": "debug enabled prof_all prof_ops verbose",
        "compile": """
            autoep_non_moe debug_log deepcompile double_buffer free_activation
            free_activation_threshold keep_all_input_tensors keep_int_input_tensors
            offload_activation offload_activation_pin_memory offload_opt_states
            offload_parameters passes symmetric_memory sync_after_allgather sync_after_reduce
            sync_before_allgather sync_before_reduce
            """,
    }.items()
}


def _unknown(path: str, key: str, valid: frozenset[str]) -> ValueError:
    dotted = f"deepspeed.{path}.{key}" if path else f"deepspeed.{key}"
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    if close:
        near = f"deepspeed.{path}.{close[0]}" if path else f"deepspeed.{close[0]}"
        return ValueError(f"unknown config key '{dotted}'; did you mean '{near}'?")
    if len(valid) <= 10:
        return ValueError(
            f"unknown config key '{dotted}'; valid keys here are: {', '.join(sorted(valid))}"
        )
    return ValueError(
        f"unknown config key '{dotted}': DeepSpeed {DEEPSPEED_VERSION} does not read it "
        f"(its keys: {DOCS})"
    )


def check_top_level_keys(ds: dict[str, Any]) -> None:
    """Every top-level key of the ``deepspeed`` section must be one DeepSpeed reads."""
    for key in ds:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown("", key, TOP_LEVEL_KEYS)


def check_section_keys(ds: dict[str, Any]) -> None:
    """The keys of the sections DeepSpeed validates strictly must be ones it knows."""
    for path, valid in SECTION_KEYS.items():
        node: Any = ds
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # absent, or a form DeepSpeed parses itself (zero_optimization: true)
        for key in node:
            if key not in valid:
                raise _unknown(path, key, valid)


def deepspeed_json_schema() -> dict[str, Any]:
    """JSON Schema keywords for the ``deepspeed`` section: the same key lists."""

    def names(keys: frozenset[str]) -> dict[str, Any]:
        return {"propertyNames": {"enum": sorted(keys)}}

    schema: dict[str, Any] = {**names(TOP_LEVEL_KEYS), "properties": {}}
    for path, keys in SECTION_KEYS.items():
        node = schema
        for part in path.split("."):
            node = node.setdefault("properties", {}).setdefault(part, {})
        node.update(names(keys))
    schema["properties"]["optimizer"].update(
        {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}
    )
    schema["required"] = ["optimizer"]
    return schema
