"""Run configuration: one JSON file per run, loaded strictly into frozen pydantic models.

The file holds the project's own sections (``model``, ``data``, ``store``, ``train``,
``checkpoint``, ``log``) plus a ``deepspeed`` section that is handed verbatim to
``deepspeed.initialize``. Unknown keys (in the ``deepspeed`` section too), duplicate keys and
values of the wrong type are errors that name their dotted path, so a typo never silently falls
back to a default. Command-line overrides (``--set train.lr_phi=0.5``) go through the same
loader.

* ``schema.py``: the sections, their types, defaults and one-line descriptions; model presets.
* ``checks.py``: checks across keys (the model's layers fit, the deepspeed section suits us).
* ``deepspeed_keys.py``: the keys DeepSpeed reads, for the ``deepspeed`` section.
* ``load.py``: JSON files, ``--set`` overrides, error messages, the resolved config.
* ``reference.py``: the README's config reference, generated from ``schema.py``.
"""

from lcm_dist.config.checks import validate, validate_model
from lcm_dist.config.load import (
    add_override_argument,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    model_from_dict,
    parse_json_text,
    parse_options,
    parse_override,
    write_resolved_config,
)
from lcm_dist.config.schema import (
    MODEL_PRESETS,
    CheckpointConfig,
    DataConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    StoreConfig,
    TrainConfig,
    bottleneck_side,
    config_json_schema,
    print_config_schema,
)

__all__ = [
    "MODEL_PRESETS",
    "CheckpointConfig",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "RunConfig",
    "StoreConfig",
    "TrainConfig",
    "add_override_argument",
    "apply_overrides",
    "bottleneck_side",
    "config_from_dict",
    "config_json_schema",
    "config_to_dict",
    "load_config",
    "model_from_dict",
    "parse_json_text",
    "parse_options",
    "parse_override",
    "print_config_schema",
    "validate",
    "validate_model",
    "write_resolved_config",
]
