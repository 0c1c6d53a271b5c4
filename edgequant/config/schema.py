"""What a config holds (Config, Factory, the keys and metrics) and its errors (ConfigError)."""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgequant.metrics import LOWER_IS_BETTER, next_token_nll
from edgequant.recipe import Recipe
from edgequant.targets import TARGETS

# Every key a config may hold, with a one-line description (errors list them).
KEYS: dict[str, str] = {
    "task": "a short name for reports (default: the config file's name without .yaml)",
    "model": '"module:function" returning the float torch.nn.Module',
    "checkpoint": "a state_dict file (or {path, strip_prefix}) loaded into the model",
    "calib_data": '"module:function" returning an iterable of model inputs',
    "eval_data": '"module:function" returning an iterable of (inputs, labels)',
    "train_data": '"module:function" returning an iterable of (inputs, labels), for QAT',
    "example_inputs": '"module:function" returning one model input (default: first calib batch)',
    "metric": '"accuracy", "perplexity" or "module:function" mapping (outputs, labels) to a float',
    "lower_is_better": "true where a smaller metric is better (default: by the metric's name, "
    "true for perplexity)",
    "tolerance": "the largest acceptable drop of the metric (default 0.01); where lower is "
    "better, the largest acceptable relative rise (0.03: at most 1.03x FP32)",
    "target": f"the deployment target, one of {', '.join(TARGETS)} (default onnxruntime)",
    "recipes": "recipes to try: preset names (w8a8, w4a8, ...) or Recipe mappings",
    "num_samples": "calibration samples to use (default: the recipe's, 512)",
    "qat_epochs": "with train_data, each recipe also runs QAT for this many epochs (default 0)",
}

REQUIRED = ("model", "calib_data")

CHECKPOINT_KEYS = ("path", "strip_prefix")

FACTORY_KEYS = ("function", "kwargs")

FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


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


def perplexity_of(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """exp(mean next-token NLL) of logits ``outputs`` (N, T, V) over token ids ``labels`` (N, T)
    (each window predicts its own next tokens: metrics.next_token_nll)."""
    total, count = next_token_nll(outputs, labels)
    if count == 0:
        raise ValueError("perplexity needs windows of at least 2 tokens")
    return math.exp(total / count)


# name -> metric(outputs of the whole eval set, labels) -> float; its direction by name:
# metrics.LOWER_IS_BETTER (a config's lower_is_better overrides it).
METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "accuracy": top1_accuracy,
    "perplexity": perplexity_of,
}

# name -> ((outputs, labels) of one batch -> (sum, count), sum / count -> the metric): the
# metrics computed batch by batch, since a language model's logits over a whole eval set
# (tokens x vocabulary) do not fit in memory.
BATCHED_METRICS: dict[
    str, tuple[Callable[[torch.Tensor, torch.Tensor], tuple[float, int]], Callable[[float], float]]
] = {"perplexity": (next_token_nll, math.exp)}

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
        if not isinstance(text, str) or not FACTORY_PATTERN.match(text):
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
    lower_is_better: bool | None = None  # None: by the metric's name (lower_is_better_metric)
    qat_epochs: int = 0
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

    @property
    def metric_name(self) -> str:
        """The metric's name for reports: a built-in's name, or a factory's function name."""
        return self.metric if isinstance(self.metric, str) else self.metric.function

    @property
    def lower_is_better_metric(self) -> bool:
        """The metric's direction: the config's lower_is_better, else by the metric's name
        (metrics.LOWER_IS_BETTER: perplexity, loss, nll)."""
        if self.lower_is_better is not None:
            return self.lower_is_better
        return self.metric_name in LOWER_IS_BETTER

    def metric_fn(self) -> Callable[[torch.Tensor, torch.Tensor], float]:
        """metric(outputs, labels) -> float over the whole eval set (its direction:
        lower_is_better_metric).

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
        batched = BATCHED_METRICS.get(self.metric) if isinstance(self.metric, str) else None
        sums, counts = 0.0, 0
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
                    out = _call_model(model_or_fn, inputs)
                    out = getattr(out, "logits", out)  # a Hugging Face output: its logits
                    outputs.append(torch.as_tensor(out).detach().cpu())
                    labels.append(torch.as_tensor(target).cpu())
                    if batched is not None:  # reduce now: an LM's logits are large
                        total, count = batched[0](outputs.pop(), labels.pop())
                        sums, counts = sums + total, counts + count
        finally:
            if module is not None:
                module.train(was_training)
        if batched is not None:
            if counts == 0:
                raise self.error("eval_data", f"{self.eval_data} returned nothing to score")
            return float(batched[1](sums / counts))
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
            "lower_is_better": self.lower_is_better_metric,
            "qat_epochs": self.qat_epochs,
        }


def _call_model(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)
