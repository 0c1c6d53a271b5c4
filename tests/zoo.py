"""Small models written the ways people write them, with seeded random weights, for the zoo tests
(tests/test_zoo.py, tests/test_zoo_edge.py): functional and module activations,
view/reshape/flatten, depthwise and grouped convolutions, 1-D convolutions (a
depthwise-separable keyword spotter pooled by F.adaptive_avg_pool1d, a signal model pooled by
nn.AdaptiveMaxPool1d), concatenation skips, upsampling, squeeze-excitation gating, LayerNorm/GELU MLPs, nn.TransformerEncoderLayer, nn.MultiheadAttention, ResNet option-A
shortcuts (zero padding, concatenation with zeros), and a tiny Hugging Face BERT encoder (when
transformers is importable).

Each entry of ZOO builds (model in eval mode, calibration batches); inputs are tiny so that
the whole matrix of models x targets x methods runs in about a minute.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BATCH, CALIB_BATCHES = 4, 2


class FunctionalMLP(nn.Module):
    """Linear layers with functional ReLU, the image flattened with view."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(48, 32), nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ModuleCNN(nn.Module):
    """nn.Sequential of Conv-BN-ReLU modules, MaxPool, nn.Flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DepthwiseSeparable(nn.Module):
    """A keyword spotter: depthwise (groups = channels) and 1x1 convs, average pool, reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.dw(x)))
        x = F.avg_pool2d(F.relu(self.pw(x)), x.shape[-2:])
        return self.fc(x.reshape(x.shape[0], -1))


class DSCNN1d(nn.Module):
    """A 1-D keyword spotter: depthwise (groups = channels) and pointwise Conv1d with BatchNorm,
    global average pooling by F.adaptive_avg_pool1d, squeeze, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 12, 5, padding=2)
        self.dw = nn.Conv1d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn = nn.BatchNorm1d(12)
        self.pw = nn.Conv1d(12, 16, 1)
        self.fc = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.pw(F.relu(self.bn(self.dw(x)))))
        return self.fc(F.adaptive_avg_pool1d(x, 1).squeeze(-1))


class GroupedConv(nn.Module):
    """Grouped convolutions (ResNeXt-style) with a channel shuffle by reshape/transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.group = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        n, c, h, w = x.shape
        x = x.reshape(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = F.relu(self.group(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Conv1dNet(nn.Module):
    """1-D convolutions over a signal, strided, global average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 5, padding=2)
        self.conv2 = nn.Conv1d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(-1))


class AdaptiveMaxPool1d(nn.Module):
    """A 1-D signal model: nn.Sequential of Conv1d, ReLU and nn.AdaptiveMaxPool1d to 4 positions,
    flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        pool = nn.AdaptiveMaxPool1d(4)
        self.features = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), pool)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class ConcatUpsample(nn.Module):
    """A U-Net-like block: downsample, upsample (nearest), concatenation skip, 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.enc(x))
        x = self.up(F.relu(self.down(skip)))
        return self.head(F.relu(self.dec(torch.cat([x, skip], dim=1))))


class SqueezeExcite(nn.Module):
    """A conv whose channels are gated by a squeeze-excitation branch (sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.se1, self.se2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3))))))
        x = x * gate[:, :, None, None]
        return self.fc(x.mean((2, 3)))


class LayerNormGELU(nn.Module):
    """A pre-norm MLP block on token vectors: LayerNorm, Linear, GELU, Linear, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(self.act(self.fc1(self.norm(h))))
        return self.head(h.mean(1))


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer (batch_first), which has a fused eval-mode fast path."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


class Attention(nn.Module):
    """nn.MultiheadAttention self-attention with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


class OptionAShortcut(nn.Module):
    """A CIFAR ResNet block pair: option-A shortcut (strided slice + channel zero pad),
    adaptive average pool and flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + self.shortcut(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))


class ZerosLikeShortcut(OptionAShortcut):
    """The option-A shortcut as a concatenation with torch.zeros_like (new channels last)."""

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, ::2, ::2]
        return torch.cat([s, torch.zeros_like(s)], 1)


class ZerosShortcut(OptionAShortcut):
    """The option-A shortcut with torch.zeros of a shape computed from x.shape, on both sides."""

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        z = torch.zeros(n, c // 2, (h + 1) // 2, (w + 1) // 2, dtype=x.dtype, device=x.device)
        return torch.cat([z, x[:, :, ::2, ::2], z], dim=1)


class NewZerosShortcut(OptionAShortcut):
    """The option-A shortcut with Tensor.new_zeros, the zeros first."""

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, ::2, ::2]
        return torch.cat((s.new_zeros(s.shape), s), dim=-3)


def _randomize_norms(model: nn.Module) -> None:
    """BatchNorm statistics away from the identity, as a trained model has them."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _batches(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, *shape, generator=gen) for _ in range(CALIB_BATCHES)]


def _tiny_bert() -> tuple[nn.Module, list[Any]]:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class Encoder(nn.Module):
        """The BERT's first-token hidden state, from input ids and an attention mask."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state[:, 0]

    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(CALIB_BATCHES):
        ids = torch.randint(1, 64, (BATCH, 6), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, 3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return Encoder().eval(), batches


def seeded_case(cls: type[nn.Module], shape: tuple[int, ...]) -> tuple[nn.Module, list[Any]]:
    """cls() with seeded weights and BatchNorm statistics as a trained model has them, in eval
    mode, and its calibration batches of inputs shaped (BATCH, *shape)."""
    torch.manual_seed(0)
    model = cls()
    _randomize_norms(model)
    return model.eval(), _batches(shape, seed=1)


def _build(cls: type[nn.Module], shape: tuple[int, ...]) -> Callable[[], tuple[nn.Module, list]]:
    return functools.partial(seeded_case, cls, shape)


ZOO: dict[str, Callable[[], tuple[nn.Module, list[Any]]]] = {
    "functional_mlp": _build(FunctionalMLP, (3, 4, 4)),
    "module_cnn": _build(ModuleCNN, (3, 8, 8)),
    "depthwise_separable": _build(DepthwiseSeparable, (1, 8, 5)),
    "ds_cnn_1d": _build(DSCNN1d, (2, 16)),
    "grouped_conv": _build(GroupedConv, (3, 6, 6)),
    "conv1d": _build(Conv1dNet, (2, 16)),
    "adaptive_max_pool1d": _build(AdaptiveMaxPool1d, (2, 16)),
    "concat_upsample": _build(ConcatUpsample, (3, 8, 8)),
    "squeeze_excite": _build(SqueezeExcite, (3, 6, 6)),
    "layernorm_gelu": _build(LayerNormGELU, (5, 8)),
    "transformer_encoder_layer": _build(EncoderLayer, (5, 8)),
    "multihead_attention": _build(Attention, (5, 8)),
    "option_a_shortcut": _build(OptionAShortcut, (3, 8, 8)),
    "option_a_zeros_like": _build(ZerosLikeShortcut, (3, 8, 8)),
}
if importlib.util.find_spec("transformers") is not None:
    ZOO["tiny_bert"] = _tiny_bert

# What eq.quantize for a fully integer target (mcu-int8) refuses in each zoo model, before any
# calibration: the op and the layer (the other models quantize fully integer).
FULLY_INTEGER_REFUSALS = {
    "squeeze_excite": r"op 'sigmoid' at 'sigmoid'",
    "layernorm_gelu": r"op 'layer_norm' at 'norm'",
    "transformer_encoder_layer": r"op 'TransformerEncoderLayer' at 'layer'",
    "multihead_attention": r"op 'attention' at 'attn'",
    "tiny_bert": r"op 'layer_norm' at 'bert\.embeddings\.LayerNorm'",
}
