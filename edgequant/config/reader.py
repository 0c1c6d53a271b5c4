"""Reading a YAML config: load_config, and the reader that validates each key with its line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from edgequant import _yaml
from edgequant.config.schema import (
    CHECKPOINT_KEYS,
    FACTORY_KEYS,
    KEYS,
    METRICS,
    REQUIRED,
    Config,
    ConfigError,
    Factory,
)
from edgequant.recipe import Recipe
from edgequant.targets import TARGETS

# --------------------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config. FileNotFoundError for a missing file; ConfigError (a
    ValueError) naming the file, the line and the key for anything wrong inside it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = _yaml.safe_load(text)
    except _yaml.DuplicateKeyError as err:
        raise ConfigError(
            path, err.line, err.key, f"duplicate key (first on line {err.first_line})"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(
            path, mark.line + 1 if mark else None, None, f"not valid YAML: {problem}"
        ) from None
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else None
        raise ConfigError(
            path, line, None, f"a config is a mapping of keys ({', '.join(KEYS)}) to values"
        )
    return _Reader(path, root).read(data)


class _Reader:
    """Validates the parsed mapping key by key, with the line of every key at hand."""

    def __init__(self, path: Path, root: Any) -> None:
        self.path = path
        self.lines: dict[str, int] = {}
        self.nodes: dict[str, Any] = {}
        for key_node, value_node in root.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in self.lines:
                raise ConfigError(
                    path, line, key, f"duplicate key (first on line {self.lines[key]})"
                )
            if key not in KEYS:
                close = _close_matches(str(key), KEYS)
                hint = f" (did you mean {close!r}?)" if close else ""
                raise ConfigError(
                    path, line, None, f"unknown key {key!r}{hint}; valid keys: {', '.join(KEYS)}"
                )
            self.lines[key] = line
            self.nodes[key] = value_node

    def fail(self, key: str, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(self.path, line or self.lines.get(key), key, message)

    def sub_lines(self, key: str) -> dict[str, int]:
        """Lines of the keys of a nested mapping (or the items of a list) under ``key``."""
        node = self.nodes.get(key)
        if isinstance(node, yaml.MappingNode):
            return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
        if isinstance(node, yaml.SequenceNode):
            return {str(i): item.start_mark.line + 1 for i, item in enumerate(node.value)}
        return {}

    def read(self, data: dict[str, Any]) -> Config:
        for key in REQUIRED:
            if key not in data:
                raise self.fail(key, "missing; it is required")
        values: dict[str, Any] = {
            "path": self.path.resolve(),
            "model": self.factory(data, "model"),
            "calib_data": self.factory(data, "calib_data"),
            "task": self.task(data),
            "tolerance": self.tolerance(data),
            "target": self.target(data),
            "num_samples": self.num_samples(data),
            "lower_is_better": self.lower_is_better(data),
            "qat_epochs": self.qat_epochs(data),
        }
        for key, attribute in (
            ("eval_data", "eval_data"),
            ("train_data", "train_data"),
            ("example_inputs", "example_inputs_fn"),
        ):
            if data.get(key) is not None:
                values[attribute] = self.factory(data, key)
        if data.get("metric") is not None:
            values["metric"] = self.metric(data)
        if data.get("checkpoint") is not None:
            values["checkpoint"], values["strip_prefix"] = self.checkpoint(data)
        lines = dict(self.lines)
        if "recipes" in data:
            values["recipes"] = self.recipes(data, values["target"])
            lines.update({f"recipes[{i}]": n for i, n in self.sub_lines("recipes").items()})
        return Config(**values, lines=MappingProxyType(lines))

    def factory(self, data: dict[str, Any], key: str) -> Factory:
        value = data[key]
        if isinstance(value, dict):
            sub = self.sub_lines(key)
            unknown = sorted(set(value) - set(FACTORY_KEYS))
            if unknown or "function" not in value:
                what = f"unknown keys {unknown}" if unknown else "no 'function'"
                raise self.fail(
                    key,
                    f'{what}; a factory is "module:function" or a mapping with '
                    f"keys {', '.join(FACTORY_KEYS)}",
                    sub.get(unknown[0]) if unknown else None,
                )
            kwargs = value.get("kwargs") or {}
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise self.fail(
                    key,
                    f"kwargs must be a mapping of names to values, got {kwargs!r}",
                    sub.get("kwargs"),
                )
            try:
                return Factory.parse(value["function"], kwargs)
            except ValueError as err:
                raise self.fail(key, str(err), sub.get("function")) from None
        try:
            return Factory.parse(value)
        except ValueError as err:
            raise self.fail(key, str(err)) from None

    def task(self, data: dict[str, Any]) -> str:
        task = data.get("task", self.path.stem.removesuffix(".yaml"))
        if not isinstance(task, str) or not task:
            raise self.fail("task", f"must be a non-empty string, got {task!r}")
        return task

    def tolerance(self, data: dict[str, Any]) -> float:
        value = data.get("tolerance", 0.01)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value < float("inf")
        ):
            raise self.fail(
                "tolerance", f"must be a number >= 0 (a metric drop, e.g. 0.01), got {value!r}"
            )
        return float(value)

    def target(self, data: dict[str, Any]) -> str:
        value = data.get("target", "onnxruntime")
        if value not in TARGETS:
            raise self.fail("target", f"unknown target {value!r}; valid: {', '.join(TARGETS)}")
        return str(value)

    def num_samples(self, data: dict[str, Any]) -> int | None:
        value = data.get("num_samples")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise self.fail("num_samples", f"must be a positive integer, got {value!r}")
        return value

    def lower_is_better(self, data: dict[str, Any]) -> bool | None:
        value = data.get("lower_is_better")
        if value is not None and not isinstance(value, bool):
            raise self.fail(
                "lower_is_better",
                f"must be true or false (or left out: by the metric's name), got {value!r}",
            )
        return value

    def qat_epochs(self, data: dict[str, Any]) -> int:
        value = data.get("qat_epochs", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail("qat_epochs", f"must be an integer >= 0, got {value!r}")
        if value > 0 and data.get("train_data") is None:
            raise self.fail(
                "qat_epochs", f"is {value}, but QAT trains on train_data, which the config lacks"
            )
        return value

    def metric(self, data: dict[str, Any]) -> str | Factory:
        value = data["metric"]
        if isinstance(value, str) and value in METRICS:
            return value
        if isinstance(value, str) and ":" not in value:
            raise self.fail(
                "metric",
                f'unknown metric {value!r}; valid: {", ".join(METRICS)} or "module:function"',
            )
        return self.factory(data, "metric")

    def checkpoint(self, data: dict[str, Any]) -> tuple[Path, str]:
        value = data["checkpoint"]
        sub = self.sub_lines("checkpoint")
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(CHECKPOINT_KEYS))
            if unknown:
                raise self.fail(
                    "checkpoint",
                    f"unknown key {unknown[0]!r}; valid: {', '.join(CHECKPOINT_KEYS)}",
                    sub.get(unknown[0]),
                )
            if "path" not in value:
                raise self.fail("checkpoint", "the mapping needs a 'path'")
            file, prefix = value["path"], value.get("strip_prefix") or ""
        else:
            file, prefix = value, ""
        if not isinstance(file, str) or not file:
            raise self.fail("checkpoint", f"must be a file path, got {file!r}", sub.get("path"))
        if not isinstance(prefix, str):
            raise self.fail(
                "checkpoint",
                f"strip_prefix must be a string, got {prefix!r}",
                sub.get("strip_prefix"),
            )
        resolved = (self.path.parent / Path(file).expanduser()).resolve()
        if not resolved.is_file():
            raise self.fail("checkpoint", f"no such file: {resolved}", sub.get("path"))
        return resolved, prefix

    def recipes(self, data: dict[str, Any], target: str) -> tuple[Recipe, ...]:
        value = data["recipes"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(
                "recipes", "must be a list of preset names (w8a8, w4a8, ...) or Recipe mappings"
            )
        sub = self.sub_lines("recipes")
        recipes: list[Recipe] = []
        for index, item in enumerate(value):
            line = sub.get(str(index))
            try:
                if isinstance(item, str):
                    recipe = Recipe.preset(item).for_target(target)
                elif isinstance(item, dict):
                    recipe = Recipe.from_dict({"target": target, **item})
                else:
                    raise ValueError(f"expected a preset name or a mapping, got {item!r}")
            except (ValueError, TypeError, KeyError) as err:
                raise self.fail(f"recipes[{index}]", str(err), line) from None
            if any(r.name == recipe.name for r in recipes):
                raise self.fail(
                    f"recipes[{index}]",
                    f"a second recipe named {recipe.name!r}; names must differ",
                    line,
                )
            recipes.append(recipe)
        return tuple(recipes)


def _close_matches(word: str, choices: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return matches[0] if matches else None
