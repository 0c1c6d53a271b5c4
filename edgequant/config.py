"""The YAML configuration of ``edgequant quantize`` and ``edgequant compare``.

A config names a model, its data and what to try; the code behind each name is imported only
when it is used (``Config.build_model()``, ``Config.calib_batches()``, ...), so a config is
validated in milliseconds and a typo is reported with its file and line before anything runs::

    model: edgequant.examples.mnist1d:trained_cnn        # "package.module:function" -> nn.Module
    calib_data: edgequant.examples.mnist1d:calib_batches # -> iterable of model inputs
    eval_data: edgequant.examples.mnist1d:eval_batches   # -> iterable of (inputs, labels)
    recipes: [w8a8, w4a8]

A factory is either that string or a mapping ``{function: "module:function", kwargs: {...}}``.
Modules are imported with the config file's folder first on ``sys.path``, so a data module can
live next to the config; relative file paths resolve against that folder too. See
``examples/*.yaml`` for every key, documented.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from edgequant.spec import TARGETS, Recipe

__all__ = ["KEYS", "METRICS", "Config", "ConfigError", "Factory", "load_config"]

# Every key a config may hold, with a one-line description (errors list them).
KEYS: dict[str, str] = {
    "task": "a short name for reports (default: the config file's name without .yaml)",
    "model": '"module:function" returning the float torch.nn.Module',
    "checkpoint": "a state_dict file (or {path, strip_prefix}) loaded into the model",
    "calib_data": '"module:function" returning an iterable of model inputs',
    "eval_data": '"module:function" returning an iterable of (inputs, labels)',
    "train_data": '"module:function" returning an iterable of (inputs, labels), for QAT',
    "example_inputs": '"module:function" returning one model input (default: first calib batch)',
    "metric": '"accuracy" or "module:function" mapping (outputs, labels) to a float',
    "tolerance": "the largest acceptable drop of the metric (default 0.01)",
    "target": f"the deployment target, one of {', '.join(TARGETS)} (default onnxruntime)",
    "recipes": "recipes to try: preset names (w8a8, w4a8, ...) or Recipe mappings",
    "num_samples": "calibration samples to use (default: the recipe's, 512)",
}
REQUIRED = ("model", "calib_data")
CHECKPOINT_KEYS = ("path", "strip_prefix")
FACTORY_KEYS = ("function", "kwargs")
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class ConfigError(ValueError):
    """A config the user must fix; the message names the file, the line and the key."""

    def __init__(self, path: Path | str, line: int | None, key: str | None, message: str) -> None:
        self.path, self.line, self.key = str(path), line, key
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# ------------------------------------------------------------------------------------- metrics


def top1_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction (0..1) of rows of ``outputs`` (N, C) whose argmax equals ``labels`` (N,)."""
    if outputs.dim() != 2 or outputs.shape[0] != labels.reshape(-1).shape[0]:
        raise ValueError(
            f"accuracy needs outputs (N, C) and N labels, got outputs {tuple(outputs.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    predicted = outputs.argmax(dim=1)
    return float((predicted == labels.reshape(-1).to(predicted.device)).double().mean())


# name -> metric(outputs of the whole eval set, labels) -> float, higher is better.
METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {"accuracy": top1_accuracy}


# ------------------------------------------------------------------------------------ factories


@dataclass(frozen=True)
class Factory:
    """A function named "module:function" (an attribute path after the colon is allowed),
    called with ``kwargs``; imported only when called."""

    module: str
    function: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str, kwargs: Mapping[str, Any] | None = None) -> Factory:
        """From "module:function"; ValueError when the text does not have that form."""
        if not isinstance(text, str) or not _FACTORY.match(text):
            raise ValueError(f'expected "package.module:function", got {text!r}')
        module, function = text.split(":")
        return cls(module, function, tuple((kwargs or {}).items()))

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.module}:{self.function}" + (f"({args})" if args else "")

    def resolve(self, search_dir: Path | None = None) -> Callable[..., Any]:
        """The function itself; ``search_dir`` is searched first for the module.

        ImportError names the module or the function that is missing.
        """
        with _path_first(search_dir):
            try:
                target: Any = importlib.import_module(self.module)
            except ModuleNotFoundError as err:
                if err.name == self.module or self.module.startswith(f"{err.name}."):
                    raise ImportError(f"module {self.module!r} not found") from err
                raise ImportError(f"importing module {self.module!r} failed: {err}") from err
            except Exception as err:  # the module's own code failed while it was imported
                raise ImportError(
                    f"importing module {self.module!r} failed: {type(err).__name__}: {err}"
                ) from err
        for part in self.function.split("."):
            if not hasattr(target, part):
                raise ImportError(f"module {self.module!r} has no function {self.function!r}")
            target = getattr(target, part)
        if not callable(target):
            raise ImportError(f"{self.module}:{self.function} is not callable")
        return target


@contextlib.contextmanager
def _path_first(folder: Path | None) -> Iterator[None]:
    """Put ``folder`` first on sys.path for the duration (a data module next to the config)."""
    if folder is None:
        yield
        return
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    """A validated config; ``load_config`` builds it from a YAML file."""

    path: Path
    model: Factory
    calib_data: Factory
    task: str = ""
    checkpoint: Path | None = None
    strip_prefix: str = ""
    eval_data: Factory | None = None
    train_data: Factory | None = None
    example_inputs_fn: Factory | None = None
    metric: str | Factory = "accuracy"
    tolerance: float = 0.01
    target: str = "onnxruntime"
    recipes: tuple[Recipe, ...] = ()
    num_samples: int | None = None
    # key (or "recipes[i]") -> its line in the file, for errors raised after loading
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def folder(self) -> Path:
        """The config file's folder: relative paths and data modules are found there."""
        return self.path.parent

    def __str__(self) -> str:
        rows = [f"config {self.path} (task {self.task!r})"]
        for key, value in self.to_dict().items():
            if key in ("config", "task") or value in (None, "", []):
                continue
            if key == "recipes":
                value = ", ".join(r.name for r in self.recipes)
            rows.append(f"  {key}: {value}")
        return "\n".join(rows)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, self.lines.get(key), key, message)

    def _call(self, key: str, factory: Factory) -> Any:
        try:
            function = factory.resolve(self.folder)
        except ImportError as err:
            raise self.error(key, str(err)) from err
        return function(**dict(factory.kwargs))

    # --- what the factories build ----------------------------------------------------------

    def build_model(self) -> nn.Module:
        """The float model, with the checkpoint loaded when there is one, in eval mode."""
        model = self._call("model", self.model)
        if not isinstance(model, nn.Module):
            raise self.error(
                "model", f"{self.model} returned {type(model).__name__}, not a torch.nn.Module"
            )
        if self.checkpoint is not None:
            self._load_checkpoint(model)
        return model.eval()

    def _load_checkpoint(self, model: nn.Module) -> None:
        assert self.checkpoint is not None
        if not self.checkpoint.is_file():
            raise self.error("checkpoint", f"no such file: {self.checkpoint}")
        try:
            # weights_only: a checkpoint is data, never code to run; map_location: a file saved
            # from CUDA tensors loads on a CPU-only torch.
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a bad or unsafe file
            raise self.error(
                "checkpoint", f"cannot load {self.checkpoint}: {type(err).__name__}: {err}"
            ) from err
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise self.error(
                "checkpoint", f"{self.checkpoint} holds {type(state).__name__}, not a state_dict"
            )
        if self.strip_prefix:
            state = {str(k).removeprefix(self.strip_prefix): v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise self.error(
                "checkpoint", f"{self.checkpoint} does not fit the model: {detail}"
            ) from err

    def calib_batches(self) -> Iterable[Any]:
        """The calibration data: an iterable of model inputs (tensors, tuples, or dicts)."""
        return self._iterable("calib_data", self.calib_data)

    def eval_batches(self) -> Iterable[Any]:
        """The evaluation data, an iterable of (inputs, labels); ValueError when not configured."""
        if self.eval_data is None:
            raise self.error("eval_data", "not set in the config")
        return self._iterable("eval_data", self.eval_data)

    def train_batches(self) -> Iterable[Any]:
        """The training data, an iterable of (inputs, labels); ValueError when not configured."""
        if self.train_data is None:
            raise self.error("train_data", "not set in the config")
        return self._iterable("train_data", self.train_data)

    def _iterable(self, key: str, factory: Factory) -> Iterable[Any]:
        data = self._call(key, factory)
        if isinstance(data, torch.Tensor):
            # A bare tensor iterates over samples that lack the batch dimension: a silent trap.
            raise self.error(
                key,
                f"{factory} returned a single Tensor; return a list of batches "
                "(for example list(x.split(64)))",
            )
        if not isinstance(data, Iterable):
            raise self.error(
                key, f"{factory} returned {type(data).__name__}, which is not iterable"
            )
        return data

    def example_inputs(self) -> Any:
        """One model input for export: from ``example_inputs``, else the first calibration batch."""
        if self.example_inputs_fn is not None:
            return self._call("example_inputs", self.example_inputs_fn)
        for batch in self.calib_batches():
            return batch
        raise self.error("calib_data", f"{self.calib_data} returned no batch")

    def metric_fn(self) -> Callable[[torch.Tensor, torch.Tensor], float]:
        """metric(outputs, labels) -> float over the whole eval set; higher is better.

        A "module:function" metric is that function itself, called with its kwargs after
        (outputs, labels).
        """
        if isinstance(self.metric, str):
            return METRICS[self.metric]
        try:
            function = self.metric.resolve(self.folder)
        except ImportError as err:
            raise self.error("metric", str(err)) from err
        kwargs = dict(self.metric.kwargs)
        return lambda outputs, labels: float(function(outputs, labels, **kwargs))

    def evaluate(
        self, model_or_fn: nn.Module | Callable[..., Any], batches: Iterable[Any] | None = None
    ) -> float:
        """The metric of a module (run in eval mode, no grad) or a callable on the eval data.

        Inputs go to the model as calibration inputs do (a tensor, a tuple of positional
        arguments, or a dict of keyword arguments); outputs may be tensors or numpy arrays.
        ``batches``: (inputs, labels) pairs to use instead of calling the eval_data factory.
        """
        outputs, labels = [], []
        module = model_or_fn if isinstance(model_or_fn, nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            with torch.no_grad():
                for item in self.eval_batches() if batches is None else batches:
                    if not isinstance(item, (tuple, list)) or len(item) != 2:
                        raise self.error(
                            "eval_data",
                            f"{self.eval_data} must yield (inputs, labels) pairs, "
                            f"got {type(item).__name__}",
                        )
                    inputs, target = item
                    outputs.append(torch.as_tensor(_call_model(model_or_fn, inputs)).detach().cpu())
                    labels.append(torch.as_tensor(target).cpu())
        finally:
            if module is not None:
                module.train(was_training)
        if not outputs:
            raise self.error("eval_data", f"{self.eval_data} returned no batch")
        return float(self.metric_fn()(torch.cat(outputs), torch.cat(labels)))

    def recipe(self, name: str | None = None) -> Recipe:
        """A recipe by name: one of the config's recipes, else a preset; None: the config's
        first recipe, else w8a8. The config's target applies to presets."""
        if name is None:
            return (
                self.recipes[0] if self.recipes else Recipe.preset("w8a8").for_target(self.target)
            )
        for recipe in self.recipes:
            if recipe.name == name:
                return recipe
        try:
            return Recipe.preset(name).for_target(self.target)
        except ValueError as err:
            mine = (
                f"; the config's recipes: {', '.join(r.name for r in self.recipes)}"
                if self.recipes
                else ""
            )
            raise ValueError(f"{err}{mine}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for results files): factories as text, recipes as mappings."""

        def text(factory: Factory | None) -> str | None:
            return None if factory is None else str(factory)

        return {
            "config": str(self.path),
            "task": self.task,
            "model": str(self.model),
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "strip_prefix": self.strip_prefix,
            "calib_data": str(self.calib_data),
            "eval_data": text(self.eval_data),
            "train_data": text(self.train_data),
            "example_inputs": text(self.example_inputs_fn),
            "metric": self.metric if isinstance(self.metric, str) else str(self.metric),
            "tolerance": self.tolerance,
            "target": self.target,
            "recipes": [r.to_dict() for r in self.recipes],
            "num_samples": self.num_samples,
        }


def _call_model(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


# --------------------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config. FileNotFoundError for a missing file; ConfigError (a
    ValueError) naming the file, the line and the key for anything wrong inside it."""
    import yaml

    from edgequant import _yaml

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
        import yaml

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
    import difflib

    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return matches[0] if matches else None
