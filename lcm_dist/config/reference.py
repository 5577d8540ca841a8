"""The README's config reference, generated from the schema's fields, so the two cannot drift.

    python -m lcm_dist.config.reference                    # print the reference (markdown)
    python -m lcm_dist.config.reference --write README.md  # rewrite it in README.md
    python launch/train.py --print-config-schema           # the JSON Schema

The reference sits in README.md between the lines ``BEGIN`` and ``END`` below; tests fail when
it differs from what this module generates.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from lcm_dist.config.schema import MODEL_PRESETS, config_json_schema

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"
COMMAND = "python -m lcm_dist.config.reference --write README.md"


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "one of " + ", ".join(str(v) for v in prop["enum"])
    names = {"integer": "int", "number": "float", "boolean": "bool", "string": "str"}
    kind = prop.get("type", "object")
    if kind == "array":
        text = f"list of {names[prop['items']['type']]}"
    else:
        text = names.get(kind, kind)
    if "minimum" in prop:
        text += f" >= {prop['minimum']}"
    if "exclusiveMinimum" in prop:
        text += f" > {prop['exclusiveMinimum']}"
    return text


def _cell(text: str) -> str:
    """Markdown-safe table cell: placeholders like <run_dir> in code spans, no bare pipes."""
    text = re.sub(r"(\S*<\w+>\S*?)(?=[,;)]?(?:\s|$))", r"`\1`", text)
    return text.replace("|", "\\|")


def _rows(schema: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    preset_keys = {key for preset in MODEL_PRESETS.values() for key in preset}
    rows = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        required = set(node.get("required", []))
        for name, prop in node["properties"].items():
            key = prefix + name
            ref = prop.get("$ref") or (prop.get("allOf") or [{}])[0].get("$ref")
            if ref:
                walk(schema["$defs"][ref.rsplit("/", 1)[-1]], key + ".")
                continue
            if name in required:
                default = "required"
            elif prefix == "model." and name in preset_keys:
                default = "preset"
            else:
                default = f"`{json.dumps(prop.get('default', {}))}`"
            rows.append((f"`{key}`", _type(prop), default, _cell(prop.get("description", ""))))

    walk(schema, "")
    return rows


def reference_markdown() -> str:
    """The config reference: one table row per key, from the schema's fields."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(config_json_schema())]
    lines.append("")
    lines.append(
        f"Generated from `lcm_dist/config/schema.py` by `{COMMAND}`; the JSON Schema of the "
        "file: `python launch/train.py --print-config-schema`."
    )
    return "\n".join(lines) + "\n"


def readme_block(text: str, source: str = "README.md") -> tuple[int, int]:
    """The line span strictly between the BEGIN and END marker lines of ``text``."""
    lines = text.splitlines()
    try:
        begin, end = lines.index(BEGIN), lines.index(END)
    except ValueError:
        raise ValueError(f"{source} lacks the line {BEGIN} or {END}") from None
    if end < begin:
        raise ValueError(f"{source} has {END} before {BEGIN}")
    return begin + 1, end


def rewrite(path: Path) -> bool:
    """Put the generated reference between the markers of ``path``; True if it changed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    begin, end = readme_block(text, str(path))
    lines = text.splitlines(keepends=True)
    new = "".join(lines[:begin]) + reference_markdown() + "".join(lines[end:])
    if new == text:
        return False
    path.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="README", help="rewrite the reference in this file")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(reference_markdown())
        return 0
    try:
        changed = rewrite(Path(args.write))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.write}: config reference {'rewritten' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
