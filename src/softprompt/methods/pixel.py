"""Visual prompting in pixel space (Bahng et al. 2022): a learned image added to the normalised input where a mask
is on: a border of width p around the image ("padding", the paper's best), or a square patch of side p at a fixed
corner. It goes into any image model (a CNN too: nothing but the input changes), with a linear head on the
model's features that trains with it.

The prompt starts at zero (the image unchanged); the head like ``nn.Linear``, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..prompts import Head, PixelPrompt
from .base import Method, MethodConfig, require
from .vpt import new_head, num_classes

SHAPES = ("border", "patch")


@dataclass
class PixelPromptConfig(MethodConfig):
    num_virtual_tokens: int = 0  # no tokens: the prompt is in the image
    shape: str = "border"  # border | patch
    width: int = 0  # border width, or the patch's side, in pixels of the input; 0: 30/224 of the side (the paper's)
    num_classes: int = 0  # default: the task's labels (init_labels)
    image_size: int = 0  # the input's side in pixels; default: the task's (else the backbone's)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shape not in SHAPES:
            raise SoftPromptError(f"pixel prompt shape must be one of {', '.join(SHAPES)} (got {self.shape!r})")
        if int(self.width) < 0:
            raise SoftPromptError(f"pixel prompt width must be >= 1, or 0 for the default (got {self.width})")


def prompt_mask(shape: str, width: int, size: int) -> torch.Tensor:
    """(S, S) bool: a border of `width` pixels, or a width x width patch at the top-left corner."""
    if 2 * width >= size and shape == "border" or width > size:
        raise SoftPromptError(f"a pixel prompt {shape} of width {width} leaves no image inside {size} px; lower "
                              "method.width")
    mask = torch.zeros(size, size, dtype=torch.bool)
    if shape == "patch":
        mask[:width, :width] = True
    else:
        mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return mask


class PixelPrompting(Method):
    name = "pixel_prompt"
    prompt_kind = "pixels"
    owns_head = True
    Config = PixelPromptConfig

    def __init__(self, pixels: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
                 config: PixelPromptConfig):
        super().__init__(config)
        if pixels.ndim != 3 or mask.shape != pixels.shape[1:]:
            raise SoftPromptError(f"a pixel prompt is (C, S, S) with an (S, S) mask; got {tuple(pixels.shape)} and "
                                  f"{tuple(mask.shape)}")
        self.config.num_virtual_tokens = 0
        self.config.num_classes = head_weight.shape[0]
        self.pixels = nn.Parameter(pixels.detach().float().clone())  # (C, S, S)
        self.register_buffer("mask", mask.detach().bool().clone(), persistent=False)
        self.head_weight = nn.Parameter(head_weight.detach().float().clone())
        self.head_bias = nn.Parameter(head_bias.detach().float().clone())

    @classmethod
    def build(cls, backbone: Any, config: PixelPromptConfig) -> PixelPrompting:
        if backbone.kind not in ("image", "vit"):
            raise SoftPromptError(f"a pixel prompt goes into an image model; backbone {backbone.name!r} is a "
                                  f"{backbone.kind!r} model")
        g = torch.Generator().manual_seed(int(config.seed))
        size, channels = int(config.image_size) or backbone.image_size, backbone.channels
        width = int(config.width) or max(1, round(size * 30 / 224))  # Bahng et al.: a 30 px pad on 224 px
        mask = prompt_mask(config.shape, width, size)
        return cls(torch.zeros(channels, size, size), mask, *new_head(backbone.hidden_size, num_classes(config), g),
                   config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> PixelPrompting:
        return cls(require(tensors, "pixels", cls.name), require(tensors, "mask", cls.name),
                   require(tensors, "head.weight", cls.name), require(tensors, "head.bias", cls.name),
                   PixelPromptConfig.from_dict(config))

    @property
    def hidden_size(self) -> int:
        return self.head_weight.shape[1]

    @property
    def image_size(self) -> int:
        return self.pixels.shape[-1]

    def describe(self) -> dict:
        return {**super().describe(), "image_size": self.image_size, "num_classes": self.head_weight.shape[0]}

    def forward(self) -> PixelPrompt:
        return PixelPrompt(self.pixels * self.mask, self.mask, Head(self.head_weight, self.head_bias))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pixels": (self.pixels * self.mask).detach(), "mask": self.mask.to(torch.uint8),
                "head.weight": self.head_weight.detach(), "head.bias": self.head_bias.detach()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors().items() if k != "mask"}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in (("pixels", self.pixels), ("head.weight", self.head_weight), ("head.bias", self.head_bias)):
            p.copy_(require(tensors, name, self.name))
