"""Helpers and toy models that several test modules share (import them as `from toys import ...`;
tests/conftest.py puts this folder on sys.path). The zoo of architectures written in many styles
is tests/zoo.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn
from zoo import Conv1dNet  # tests/zoo.py

import edgequant as eq
from edgequant import functional as F
from edgequant.observers import OBSERVERS
from edgequant.spec import QuantSpec, weight_spec


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator, so a test's random data does not depend on the tests before it."""
    return torch.Generator().manual_seed(seed)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (float32 compared as int32: -0.0 != 0.0, NaN == same NaN)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool((a.view(torch.int32) == b.view(torch.int32)).all())
    )


def randn_rows(rows: int = 16, features: int = 8, seed: int = 0) -> torch.Tensor:
    """A (rows, features) batch of standard normal values from generator `seed`."""
    return torch.randn(rows, features, generator=gen(seed))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||."""
    return float((actual - expected).norm() / expected.norm())


def same_state_dict(a: nn.Module, b: nn.Module) -> bool:
    """The same keys, and every tensor equal."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def by_op(result: Any) -> dict[str, str]:
    """An eq.check result as {op: action}, for its rows."""
    return {r.op: r.action for r in result.rows}


def tensor_batches(shape: tuple[int, ...], n: int, seed: int) -> list[torch.Tensor]:
    """n random batches of one shape, batch i drawn from generator seed + i."""
    return [torch.randn(*shape, generator=gen(seed + i)) for i in range(n)]


def keyword_batches(n: int, seed: int, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """n keyword batches for `Keywords`: features (batch, 6) and a positive gain (batch, 1)."""
    g = gen(seed)
    return [
        {
            "features": torch.randn(batch, 6, generator=g),
            "gain": torch.rand(batch, 1, generator=g) + 0.5,
        }
        for _ in range(n)
    ]


# --- observers ----------------------------------------------------------------------------------


class Shuffled:
    """Batches in a new order every epoch, drawn from the global generator (as a DataLoader
    with shuffle=True does): resuming must restore that generator too."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> None:
        self.x, self.y, self.batch = x, y, batch

    def __len__(self) -> int:
        return (len(self.x) + self.batch - 1) // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x))
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            yield self.x[idx], self.y[idx]


def fit_fixed_adam(
    qat: nn.Module, data: Any, teacher: nn.Module, **settings: Any
) -> list[dict[str, Any]]:
    """Three epochs of Adam at a fixed rate (3e-3, not scaled by the grid), distilling from
    `teacher` and keeping the last epoch: the training in which a QAT loss term's effect is
    measured, with `settings` switching the term on."""
    return eq.fit_qat(
        qat,
        data,
        epochs=3,
        lr=3e-3,
        lr_scaling="none",
        optimizer="adam",
        teacher=teacher,
        progress=False,
        select="last",
        **settings,
    )


def result_row(
    name: str,
    family: str,
    method: str,
    weight_bits: int,
    act_bits: int | None,
    metric: float,
    size_bytes: int,
    bs1_ms: float,
    bs64_ms: float,
    **fields: Any,
) -> dict[str, Any]:
    """One run of a results file (DESIGN §1) that succeeded, as compare writes it, against a
    baseline of 120,000 bytes; `fields` change or add keys."""
    row = {
        "name": name,
        "family": family,
        "method": method,
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "metric_simulated": metric,
        "metric_deployed": metric,
        "top1_agreement": 0.99,
        "size_bytes": size_bytes,
        "size_ratio": size_bytes / 120_000,
        "latency_ms": {"bs1": bs1_ms, "bs64": bs64_ms},
        "wall_s": 1.0,
        "labels_used": family == "qat",
        "samples_used": 512,
        "status": "ok",
    }
    return {**row, **fields}


def failed_row(*run: Any, error: str, wall_s: float, **fields: Any) -> dict[str, Any]:
    """One run of a results file (DESIGN §1) that failed, as compare writes it: `run` is (name,
    family, method, weight_bits, act_bits) as result_row takes them; `fields` add keys."""
    row = dict(zip(("name", "family", "method", "weight_bits", "act_bits"), run, strict=True))
    return {**row, "status": "failed", "error": error, "wall_s": wall_s, **fields}


def per_tensor(bits: int = 8, signed: bool = True, observer: str = "minmax") -> QuantSpec:
    """A per-tensor spec for an observer test: symmetric when signed."""
    return QuantSpec(bits=bits, signed=signed, symmetric=signed, observer=observer)


def per_channel(axis: int = 0, bits: int = 8, observer: str = "minmax") -> QuantSpec:
    """A per-channel spec for an observer test."""
    return QuantSpec(bits=bits, granularity="channel", axis=axis, observer=observer)


def per_group(group_size: int, axis: int = 1, bits: int = 4, observer: str = "minmax") -> QuantSpec:
    """A per-group spec for an observer test."""
    return QuantSpec(
        bits=bits, granularity="group", axis=axis, group_size=group_size, observer=observer
    )


def observe(spec: QuantSpec, *batches: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, ...]:
    """The range the spec's observer gives after seeing the batches in order."""
    obs = OBSERVERS[spec.observer](spec, **kwargs)  # type: ignore[arg-type]
    for batch in batches:
        obs(batch)
    return obs.compute_range()


def quant_mse(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> float:
    """Mean squared error of fake-quantizing x on the grid the range gives."""
    scale, zero_point = F.calc_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    axis = None if spec.per_tensor else spec.axis
    fq = F.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax, axis, spec.group_size)
    return float((fq - x).double().pow(2).mean())


def never_called(model: nn.Module) -> float:
    """An eval_fn that fails the test if it runs: for arguments that must be refused first."""
    raise AssertionError("eval_fn ran: the bad argument was not refused before the search")


def weight_bits(qmodel: nn.Module) -> dict[str, int]:
    """Each quantized layer's weight bit width, by layer name."""
    from edgequant.modules import QuantMixin

    return {
        n: m.weight_quantizer.spec.bits
        for n, m in qmodel.named_modules()
        if isinstance(m, QuantMixin) and m.weight_quantizer is not None
    }


def nearest_recipe(calib_samples: int) -> Any:
    """The mixed-precision base recipe at 8 bits with round-to-nearest and no bias correction,
    which keeps the mixed-precision tests quick (tests/mixed/test_sensitivity.py covers the GPTQ
    and bias-correction pipeline that the default recipe runs at <= 4 bits)."""
    from edgequant.mixed.sensitivity import base_recipe

    return base_recipe(None, 8).replace(
        calib_samples=calib_samples, rounding="nearest", bias_correction=False
    )


def relu_mlp(*widths: int) -> nn.Sequential:
    """Linear layers of the given widths with a ReLU between each two, built after seeding torch
    (0) so every call gives the same weights, in eval mode: relu_mlp(8, 16, 4)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).eval()


class MLP(nn.Module):
    """Two Linear layers, 16 -> 32 -> 4 unless told, with a ReLU between."""

    def __init__(self, features: int = 16, hidden: int = 32, out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    """Conv + BN + ReLU, depthwise conv, pooling, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.dw(x)))
        return self.fc(self.pool(x).flatten(1))


class EmbedNorm(nn.Module):
    """An embedding table, LayerNorm and a Linear head over the mean of the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.emb(ids)).mean(1))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if float(h.sum()) > -1.0:
            h = h * 2
        return self.b(h)


class Keywords(nn.Module):
    """Takes keyword tensors, as a Hugging Face model takes a tokenizer batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, features: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(features)) * gain)


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> pool -> linear, with badly balanced channels."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv1.weight.mul_(torch.logspace(-1, 1, 8).reshape(-1, 1, 1, 1))
            self.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            self.bn.running_var.uniform_(0.5, 2.0, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def chain_batches(n: int = 64, seed: int = 1) -> list[torch.Tensor]:
    """n random images (3, 8, 8) for `Chain`, in batches of 16."""
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, 8, 8, generator=g).split(16))


def quantize_chain(model: nn.Module, preset: str = "w4a8", **changes: object) -> nn.Module:
    """eq.quantize(method="static") of a `Chain` on `chain_batches()`, with the preset changed."""
    recipe = eq.Recipe.preset(preset).replace(**changes)
    return eq.quantize(model, recipe, chain_batches(), method="static")


class SeededMLP(MLP):
    """MLP 32 -> 64 -> 8; seeds torch (0) before building, so every instance starts from the
    same weights."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(32, 64, 8)


class TinyResidual(nn.Module):
    """A toy residual block on 4 channels: F.relu and an add of the block's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch_F.relu(self.conv1(x))
        y = torch_F.relu(self.conv2(y) + x)
        return self.fc(y.mean((2, 3)))


def small_resnet_case(n_test: int) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    """(SmallResNet in eval mode with non-trivial BN statistics, four calibration batches of 32
    images of 3x12x12, `n_test` held-out images)."""
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 3, 12, 12, generator=g) for _ in range(4)]
    test = torch.randn(n_test, 3, 12, 12, generator=g)
    return model, calib, test


class SmallResNet(nn.Module):
    """conv-bn-relu, a residual block, pooling and a linear head: a small ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch_F.relu(self.bn(self.stem(x)))
        y = self.conv2(torch_F.relu(self.conv1(x)))
        x = torch_F.relu(x + y)
        return self.head(torch_F.adaptive_avg_pool2d(x, 1).flatten(1))


BERT_HIDDEN, BERT_LAYERS, BERT_VOCAB, BERT_FFN = 32, 2, 64, 64


def random_bert() -> torch.nn.Module:
    """A tiny random BERT for the transformer PTQ tests (they plant their own outliers in it): a
    2-layer BertModel with seeded random weights, in eval mode."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=BERT_HIDDEN,
        num_hidden_layers=BERT_LAYERS,
        num_attention_heads=2,
        intermediate_size=BERT_FFN,
        max_position_embeddings=64,
        attn_implementation="eager",
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def bert_batches(
    lengths: list[int], batch: int = 4, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Tokenizer-like batches, padded per batch (the last sentence of each is shorter)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(1, BERT_VOCAB, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[-1, length // 2 :] = 0
        ids[-1, length // 2 :] = 0
        out.append(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        )
    return out


def bert_hidden(model: Any, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Every token's last hidden state, (tokens, BERT_HIDDEN)."""
    with torch.no_grad():
        return torch.cat([model(**b).last_hidden_state.flatten(0, 1) for b in data])


def run_ort(
    path: str | os.PathLike[str], item: torch.Tensor | dict[str, torch.Tensor]
) -> torch.Tensor:
    """The first output of the ONNX model in ONNX Runtime; a dict item feeds inputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if isinstance(item, dict):
        assert sorted(names) == sorted(item)
        feeds = {k: v.numpy() for k, v in item.items()}
    else:
        assert len(names) == 1
        feeds = {names[0]: item.numpy()}
    return torch.from_numpy(np.asarray(session.run(None, feeds)[0]))


# --- a tiny causal LM -------------------------------------------------------------------------

LLAMA_VOCAB, LLAMA_HIDDEN, LLAMA_CONTEXT = 256, 64, 64


def tiny_llama(layers: int = 2, seed: int = 0, tied: bool = True) -> torch.nn.Module:
    """A tiny random LlamaForCausalLM (skips the test without transformers), with outlier input
    channels planted in its norms as trained LMs have them."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=LLAMA_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LLAMA_CONTEXT,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Outlier input channels, as trained LMs have: AWQ's scaling has something to find.
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[:4] = 8.0
            block.post_attention_layernorm.weight[5:8] = 6.0
    return model


def token_batches(count: int = 4, tokens: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random token ids for `tiny_llama` as tokenizer batches of two sequences each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA_VOCAB, (count, tokens), generator=g)
    return [
        {"input_ids": ids[i : i + 2], "attention_mask": torch.ones_like(ids[i : i + 2])}
        for i in range(0, count, 2)
    ]


def lm_recipe(bits: int = 4, group: int | None = 32, **kw: object) -> eq.Recipe:
    """A weight-only integer recipe (no activations) with 8-bit first and last layers."""
    return eq.Recipe(
        name=f"int{bits}", weight=weight_spec(bits, group), activation=None, first_last_bits=8, **kw
    )


# The toy models the eq.quantize tests run on: (class, shape of one calibration batch; None for
# keyword batches).
QUANTIZE_MODELS = {
    "cnn": (SmallCNN, (4, 3, 8, 8)),
    "mlp": (MLP, (4, 16)),
    "conv1d": (Conv1dNet, (4, 2, 16)),
    "residual": (TinyResidual, (4, 4, 6, 6)),
    "keywords": (Keywords, None),
}


def quantize_case(name: str) -> tuple[nn.Module, list, object]:
    """The toy model QUANTIZE_MODELS[name] in eval mode with non-trivial BN statistics, its
    calibration items and one test item (the eq.quantize tests')."""
    cls, shape = QUANTIZE_MODELS[name]
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen(1))
                m.running_var.uniform_(0.5, 1.5, generator=gen(2))
    if shape is None:
        # Six input features: a few more samples than the tensor models for the ranges to settle.
        return model, keyword_batches(8, seed=10, batch=8), keyword_batches(1, seed=99, batch=16)[0]
    return model, tensor_batches(shape, 4, seed=10), torch.randn(16, *shape[1:], generator=gen(99))


def run_item(model: nn.Module, item: object) -> torch.Tensor:
    """model's output on a test item of quantize_case, without gradients."""
    with torch.no_grad():
        return model(**item) if isinstance(item, dict) else model(item)


class PoolHead(nn.Module):
    """F.adaptive_max_pool1d(x, 3) inside a child module: the layer a refusal must name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_F.adaptive_max_pool1d(x, 3)


class AdaptivePools(nn.Module):
    """Conv1d, then an adaptive max pool to 3 steps (a function in layer 'head', or the module
    'pool'), Linear: whole windows on 12 steps, windows of 3 and 4 steps on 10."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.head: nn.Module = PoolHead() if functional else nn.Identity()
        self.pool: nn.Module = nn.Identity() if functional else nn.AdaptiveMaxPool1d(3)
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(torch.relu(self.conv(x))))
        return self.fc(x.flatten(1))
