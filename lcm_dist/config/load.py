"""Reading a run config: JSON files, ``--set`` overrides, and errors that name the dotted key.

The models in ``schema.py`` check the values; this module turns their complaints into one
sentence that names the file (or the ``--set`` to blame) and the dotted path of the key, e.g.
``configs/demo.json: unknown config key 'train.lr_phy'; did you mean 'train.lr_phi'?``.
JSON objects with a key twice are rejected here, before the schema sees them.
"""

from __future__ import annotations

import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from lcm_dist.config.schema import ModelConfig, RunConfig


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
    try:
        data = _pairs_to_dict(raw, "")
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object at the top level")
    return data


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _section_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys of the section at ``loc`` (a path of field names from ``root``)."""
    cls = root
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        inner = field.annotation if field is not None else None
        if typing.get_origin(inner) or not (
            isinstance(inner, type) and issubclass(inner, BaseModel)
        ):
            return []
        cls = inner
    return list(cls.model_fields)


_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "an object",
}


def _describe(error: dict[str, Any], root: type[BaseModel], prefix: tuple[str, ...]) -> str:
    """One pydantic error as a sentence naming the dotted config key."""
    kind, loc, value = error["type"], prefix + tuple(error["loc"]), error.get("input")
    ctx, path = error.get("ctx") or {}, _dotted(loc)
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])  # a check of checks.py: its message names the keys
    if kind == "extra_forbidden":
        keys = _section_keys(root, tuple(error["loc"])[:-1])
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        if close:
            return f"unknown config key '{path}'; did you mean '{_dotted(loc[:-1] + (close[0],))}'?"
        return f"unknown config key '{path}'; valid keys here are: {', '.join(sorted(keys))}"
    if kind == "missing":
        return f"missing required config key '{path}'"
    if kind in ("model_type", "model_attributes_type"):
        where = f"config section '{path}'" if path else "the config"
        return f"{where} must be a JSON object, got {value!r}"
    if kind in _TYPE_WORDS:
        return f"config key '{path}' must be {_TYPE_WORDS[kind]}, got {value!r}"
    if kind == "finite_number":
        return f"config key '{path}' must be finite, got {value!r}"
    if kind == "literal_error":
        return f"config key '{path}' is {value!r}; use {ctx['expected']}"
    if kind == "greater_than_equal":
        return f"config key '{path}' is {value!r}; it must be >= {ctx['ge']}"
    if kind == "greater_than":
        bound = "positive" if ctx["gt"] == 0 else f"> {ctx['gt']}"
        return f"config key '{path}' is {value!r}; it must be {bound}"
    return f"config key '{path}' is {value!r}: {error['msg'][0].lower()}{error['msg'][1:]}"


def _first_error(err: ValidationError, root: type[BaseModel], prefix: tuple[str, ...]) -> str:
    """The error to report: an unknown key first (a typo usually explains the rest)."""
    errors = err.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    return _describe(first, root, prefix)


def config_from_dict(raw: dict[str, Any], source: str = "the config") -> RunConfig:
    """Build and validate a RunConfig from a parsed JSON dict."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{source}: {_first_error(err, RunConfig, ())}") from None


def model_from_dict(raw: dict[str, Any], source: str = "the model config") -> ModelConfig:
    """A ModelConfig from a ``model`` section (e.g. one saved in a checkpoint or an export)."""
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{source}: {_first_error(err, ModelConfig, ('model',))}") from None


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
    return cfg.model_dump(mode="json")


def write_resolved_config(cfg: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Write the fully resolved config next to the run, atomically."""
    out = Path(run_dir) / "config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    os.replace(tmp, out)
    return out
