"""ml_collections config files and `--config.key=value` overrides.

A config file is a Python file with `get_config()` returning a ConfigDict.
Overrides are typed by the existing value; an unknown key fails with the valid
keys at that level, so a typo never silently trains with a default.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence

import ml_collections


def load_config(path: str) -> ml_collections.ConfigDict:
    """Run `get_config()` of a config file (`path` or `path:argument`)."""
    path, _, argument = path.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config() function")
    config = module.get_config(argument) if argument else module.get_config()
    return config


def _parse(text: str, current, key: str):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text  # an unset optional field: take the string as given
        raise ValueError(f"--config.{key}={text}: not a valid {type(current).__name__}") from None
    if current is None or value is None:
        return value
    if isinstance(current, bool) != isinstance(value, bool):
        raise ValueError(f"--config.{key}={text}: expected {type(current).__name__}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if isinstance(current, (ml_collections.ConfigDict, dict)) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)  # a whole section, e.g. --config.mesh="{'data': 2, ...}"
    if not isinstance(value, type(current)):
        raise ValueError(f"--config.{key}={text}: expected {type(current).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` (or `config.a.b=value`) strings in order."""
    for item in overrides:
        body = item.removeprefix("--").removeprefix("config.")
        if "=" not in body:
            raise ValueError(f"override {item!r} must look like --config.key=value")
        key, text = body.split("=", 1)
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                valid = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
                raise KeyError(f"unknown config key '{key}': '{part}' is not in {where}; valid keys there: "
                               f"{', '.join(valid)}")
            if depth < len(parts) - 1:
                node = node[part]
        with config.unlocked() if isinstance(config, ml_collections.ConfigDict) else _null():
            node[parts[-1]] = _parse(text, node[parts[-1]], key)
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, where: str = "") -> None:
    """Fail on keys of `config` that `reference` (the trainer's defaults) does not know."""
    for key in config.keys():
        path = f"{where}.{key}" if where else key
        if key not in reference:
            raise KeyError(f"unknown config key '{path}'; valid keys{' under ' + where if where else ''}: "
                           f"{', '.join(sorted(reference.keys()))}")
        if key == "overrides":  # free-form: another trainer's keys, checked against that trainer's config
            continue
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(reference[key],
                                                                            ml_collections.ConfigDict):
            check_keys(config[key], reference[key], path)
