"""Load, merge and validate the workflow configuration.

Snakemake and every CLI stage read the same YAML files through the same schema, so a
typo fails identically in both orchestrators, before any work starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DEFAULT_CONFIG = Path("config/config.yaml")


class ConfigError(ValueError):
    """A configuration value the user must fix; its message is shown as is."""


def schema_path() -> Path:
    """Path of the JSON schema, shipped inside the package so the CLI works anywhere."""
    return Path(str(resources.files("imgembed") / "schemas" / "config.schema.yaml"))


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text(encoding="utf-8"))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge key by key like Snakemake's --configfile: dicts recurse, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, not {type(data).__name__}")
    return data


def _describe(error: jsonschema.ValidationError) -> str:
    """One line naming the dotted key and what is allowed."""
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(schema.get("properties", {})))
        extra = sorted(set(error.instance) - set(schema.get("properties", {})))
        where = f"'{key}'" if error.absolute_path else "the top level"
        return f"unknown key(s) {', '.join(repr(e) for e in extra)} in {where}; allowed: {allowed}"
    if error.validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        return f"'{key}' is {json.dumps(error.instance)}; allowed values: {allowed}"
    if error.validator == "required":
        return f"'{key}' is missing {error.message.split(' is a required')[0]}"
    allowed = _allowed(schema)
    if allowed:
        return f"'{key}' is {_show(error.instance)}; allowed: {allowed}"
    return f"'{key}': {error.message}"


_KINDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "array": "a list", "object": "a mapping of keys", "null": "null"}


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML (true, null, "text")."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _allowed(schema: dict[str, Any]) -> str:
    """What a schema node accepts, in words: 'a number > 0', 'a list of 2 numbers > 0 and <= 1'."""
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) for v in schema["enum"])
    if "const" in schema:
        return _show(schema["const"])
    if "anyOf" in schema:
        return " or ".join(filter(None, (_allowed(option) for option in schema["anyOf"])))
    kinds = schema.get("type")
    if kinds is None:
        return ""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    words = " or ".join(_KINDS.get(k, k) for k in kinds)
    bounds = [f"{op} {schema[name]}" for name, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                      ("maximum", "<="), ("exclusiveMaximum", "<")) if name in schema]
    if bounds:
        words += " " + " and ".join(bounds)
    if schema.get("minLength") == 1:
        words = words.replace("a string", "a non-empty string")
    if "pattern" in schema:
        words += f" matching {schema['pattern']}"
    if "array" in kinds:
        low, high = schema.get("minItems"), schema.get("maxItems")
        size = f"{low}" if low is not None and low == high else f"at least {low}" if low else ""
        items = _allowed(schema.get("items", {})) if isinstance(schema.get("items"), dict) else ""
        if size or items:
            words = "a non-empty list" if size == "at least 1" else "a list" + (f" of {size} items" if size else "")
            words += f", each {items}" if items else ""
        if schema.get("uniqueItems"):
            words += ", without repeats"
    return words


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Raise ConfigError naming the first bad key (sorted by key path), else return config."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError("invalid config: " + _describe(errors[0]))
    return config


def load_config(paths: list[Path] | None = None) -> dict[str, Any]:
    """Merge the given YAML files in order (default: config/config.yaml) and validate."""
    paths = list(paths or [DEFAULT_CONFIG])
    config: dict[str, Any] = {}
    for path in paths:
        config = merge(config, read_yaml(path))
    return validate(config)


def fingerprint(*sections: Any) -> str:
    """Stable hash of config sections, so a checkpoint is only resumed by the run that made it."""
    blob = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
