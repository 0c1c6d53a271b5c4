"""The YAML config: validation with file, line and key in every error; lazy factories."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from toys import same_state_dict  # tests/toys.py

from edgequant.config import KEYS, Config, ConfigError, Factory, load_config

REPO = Path(__file__).resolve().parents[2]

# A data module next to the config: the config's folder is searched first for modules.
HELPERS = """
import torch
from torch import nn

def model(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))

def calib(n=3):
    return [torch.full((2, 3), float(i)) for i in range(n)]

def evaluation():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return [(x, torch.tensor([0, 1]))]

def example():
    return torch.zeros(1, 3)

def mean_output(outputs, labels, scale=1.0):
    return float(outputs.mean()) * scale

def tensor():
    return torch.zeros(4, 3)

def not_a_model():
    return 42
"""


@pytest.fixture(autouse=True)
def _fresh_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test imports its own cfg_helpers.py (from its tmp_path), not a cached one."""
    monkeypatch.delitem(sys.modules, "cfg_helpers", raising=False)


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    (tmp_path / "cfg_helpers.py").write_text(HELPERS)
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    return info.value


MINIMAL = """
model: cfg_helpers:model
calib_data: cfg_helpers:calib
"""


# --------------------------------------------------------------------------------- happy path


def test_full_config_builds_everything(tmp_path: Path) -> None:
    _write(tmp_path, MINIMAL)
    reference = Factory("cfg_helpers", "model").resolve(tmp_path)(width=5)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    (tmp_path / "weights").mkdir()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "weights" / "w.pt")
    path = _write(
        tmp_path,
        """
        task: tiny
        model:
          function: cfg_helpers:model
          kwargs: {width: 5}
        checkpoint:
          path: weights/w.pt          # relative to this file's folder
          strip_prefix: "module."
        calib_data: {function: cfg_helpers:calib, kwargs: {n: 4}}
        eval_data: cfg_helpers:evaluation
        example_inputs: cfg_helpers:example
        metric: {function: cfg_helpers:mean_output, kwargs: {scale: 2.0}}
        tolerance: 0.02
        target: onnxruntime
        recipes:
          - w8a8
          - {name: mine, weight: {bits: 4, granularity: channel, axis: 0}, activation: null}
        num_samples: 6
        """,
    )
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.task == "tiny" and config.tolerance == 0.02 and config.num_samples == 6
    assert config.checkpoint == (tmp_path / "weights" / "w.pt").resolve()
    assert str(config.model) == "cfg_helpers:model(width=5)"
    assert [r.name for r in config.recipes] == ["w8a8", "mine"]
    assert config.recipes[1].weight_only and config.recipes[1].weight.bits == 4  # type: ignore[union-attr]

    model = config.build_model()
    assert not model.training
    assert same_state_dict(model, reference)
    assert [float(b[0, 0]) for b in config.calib_batches()] == [0.0, 1.0, 2.0, 3.0]
    assert torch.equal(config.example_inputs(), torch.zeros(1, 3))
    with torch.no_grad():
        expected = 2.0 * float(model(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])).mean())
    assert config.evaluate(model) == pytest.approx(expected)

    assert config.recipe().name == "w8a8" and config.recipe("mine") is config.recipes[1]
    assert config.recipe("w4a4").name == "w4a4"  # presets are always available
    with pytest.raises(ValueError, match="the config's recipes: w8a8, mine"):
        config.recipe("nope")
    assert config.to_dict()["recipes"][1]["name"] == "mine"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.task = "other"  # type: ignore[misc]


def test_defaults_and_accuracy_metric(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL + "eval_data: cfg_helpers:evaluation\n"))
    assert config.task == "cfg" and config.tolerance == 0.01 and config.target == "onnxruntime"
    assert config.metric == "accuracy" and config.recipes == () and config.num_samples is None
    assert config.recipe().name == "w8a8"
    assert torch.equal(config.example_inputs(), torch.zeros(2, 3))  # the first calibration batch

    def perfect(x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] * 10

    assert config.evaluate(perfect) == 1.0
    assert config.evaluate(lambda x: -perfect(x)) == 0.0


@pytest.mark.parametrize("name", ["mnist1d_cnn.yaml", "cifar10_resnet20.yaml"])
def test_example_configs_load_and_document_every_key(name: str) -> None:
    path = REPO / "examples" / name
    config = load_config(path)
    assert config.task and config.recipes and config.eval_data is not None
    text = path.read_text()
    for key in KEYS:
        assert f"# {key} (" in text or f"# {key}:" in text, f"{name} does not document {key!r}"


def test_example_config_factories_resolve_without_running() -> None:
    config = load_config(REPO / "examples" / "cifar10_resnet20.yaml")
    for factory in (config.model, config.calib_data, config.eval_data, config.train_data):
        assert callable(factory.resolve(config.folder))  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------- errors


def test_unknown_key_names_file_line_and_valid_keys(tmp_path: Path) -> None:
    error = _error(tmp_path, MINIMAL + "\ntolerence: 0.05\n")
    message = str(error)
    assert error.line == 4 and "cfg.yaml, line 4:" in message
    assert "unknown key 'tolerence'" in message and "did you mean 'tolerance'" in message
    assert "valid keys: " + ", ".join(KEYS) in message
    assert isinstance(error, ValueError)


def test_missing_required_key(tmp_path: Path) -> None:
    message = str(_error(tmp_path, "model: cfg_helpers:model\n"))
    assert "cfg.yaml: calib_data: missing; it is required" in message


def test_malformed_values_name_key_and_line(tmp_path: Path) -> None:
    cases = {
        "model: cfg_helpers.model\n": ("model", 1, '"package.module:function"'),
        "tolerance: -1\n": ("tolerance", 3, "number >= 0"),
        "tolerance: yes\n": ("tolerance", 3, "number >= 0"),
        "target: tpu\n": ("target", 3, "valid: onnxruntime"),
        "num_samples: 0\n": ("num_samples", 3, "positive integer"),
        "metric: f1\n": ("metric", 3, "unknown metric 'f1'"),
        "task: ''\n": ("task", 3, "non-empty string"),
        "eval_data: {function: cfg_helpers:evaluation, kwarg: {}}\n": (
            "eval_data",
            3,
            "unknown keys ['kwarg']",
        ),
        "checkpoint: {path: w.pt, strip: module.}\n": ("checkpoint", 3, "unknown key 'strip'"),
    }
    for extra, (key, line, text) in cases.items():
        yaml_text = extra + "calib_data: cfg_helpers:calib\n" if key == "model" else MINIMAL + extra
        error = _error(tmp_path, yaml_text)
        assert (error.key, error.line) == (key, line), (extra, str(error))
        assert text in str(error) and "cfg.yaml, line" in str(error), str(error)


def test_bad_recipe_names_its_list_item_line(tmp_path: Path) -> None:
    error = _error(tmp_path, MINIMAL + "recipes:\n  - w8a8\n  - w9z9\n")
    assert (error.key, error.line) == ("recipes[1]", 5) and "unknown preset 'w9z9'" in str(error)
    error = _error(tmp_path, MINIMAL + "recipes:\n  - w8a8\n  - {name: x, bitz: 3}\n")
    assert error.line == 5 and "unknown keys ['bitz']" in str(error)
    error = _error(tmp_path, MINIMAL + "recipes: [w8a8, w8a8]\n")
    assert "a second recipe named 'w8a8'" in str(error)


def test_missing_checkpoint_file_is_reported_at_load(tmp_path: Path) -> None:
    error = _error(tmp_path, MINIMAL + "checkpoint:\n  path: nowhere.pt\n")
    assert (error.key, error.line) == ("checkpoint", 4)
    assert f"no such file: {(tmp_path / 'nowhere.pt').resolve()}" in str(error)


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "w.pt")
    config = load_config(_write(tmp_path, MINIMAL + "checkpoint: w.pt\n"))
    with pytest.raises(
        ConfigError, match=r"cfg.yaml, line 3: checkpoint: .*w.pt does not fit the model"
    ):
        config.build_model()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.filename == str(tmp_path / "absent.yaml")


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    error = _error(tmp_path, MINIMAL + "recipes: [w8a8\n")
    assert "not valid YAML" in str(error) and error.line is not None and error.line >= 3
    assert "a config is a mapping" in str(_error(tmp_path, "- model\n"))
    error = _error(tmp_path, MINIMAL + "model: cfg_helpers:model\n")
    assert (error.key, error.line) == ("model", 3) and "duplicate key (first on line 1)" in str(
        error
    )


def test_factories_are_imported_lazily_and_name_what_is_missing(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path,
            """
            model: no_such_module_xyz:model
            calib_data: cfg_helpers:no_such_function
            eval_data: cfg_helpers:not_a_model
            metric: cfg_helpers:absent_metric
            """,
        )
    )
    with pytest.raises(ConfigError, match=r"line 1: model: module 'no_such_module_xyz' not found"):
        config.build_model()
    with pytest.raises(
        ConfigError,
        match=r"line 2: calib_data: module 'cfg_helpers' has no function 'no_such_function'",
    ):
        config.calib_batches()
    with pytest.raises(
        ConfigError, match=r"line 3: eval_data: .* returned int, which is not iterable"
    ):
        config.eval_batches()
    with pytest.raises(ConfigError, match=r"line 4: metric: .* no function 'absent_metric'"):
        config.metric_fn()
    (tmp_path / "cfg_broken.py").write_text("import cfg_dependency_xyz\n")
    broken = load_config(
        _write(tmp_path, "model: cfg_broken:model\ncalib_data: cfg_helpers:calib\n")
    )
    with pytest.raises(ConfigError, match="importing module 'cfg_broken' failed: No module named"):
        broken.build_model()
    wrong = load_config(
        _write(tmp_path, "model: cfg_helpers:not_a_model\ncalib_data: cfg_helpers:tensor\n")
    )
    with pytest.raises(ConfigError, match="returned int, not a torch.nn.Module"):
        wrong.build_model()
    with pytest.raises(ConfigError, match="returned a single Tensor; return a list of batches"):
        wrong.calib_batches()
    with pytest.raises(ConfigError, match="eval_data: not set in the config"):
        wrong.eval_batches()


def test_a_key_given_twice_inside_a_nested_mapping_is_named(tmp_path: Path) -> None:
    # Before: PyYAML kept the last value silently (kwargs {n: 8}).
    text = MINIMAL + "train_data:\n  function: cfg_helpers:calib\n  kwargs:\n    n: 4\n    n: 8\n"
    error = _error(tmp_path, text)
    assert error.key == "n" and error.line == 7
    assert "duplicate key (first on line" in str(error)
