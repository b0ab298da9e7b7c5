"""Visual prompt tuning (Jia et al. 2022): learnable tokens inserted after a ViT's CLS token, in the first layer
only (VPT-shallow) or a fresh set before every layer (VPT-deep, the previous layer's prompt outputs dropped), with
a linear head on the final CLS state that trains with them. Zero tokens is the linear probe (the head alone).

Tokens start as the paper's uniform Xavier, +-sqrt(6 / (3 * patch^2 + width)); dropout on the tokens while
training (0.1, the paper's). The head starts like ``nn.Linear`` (uniform +-1/sqrt(width)), seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..prompts import Head, PatchPrompt
from .base import Method, MethodConfig, require


@dataclass
class VPTConfig(MethodConfig):
    num_virtual_tokens: int = 10
    deep: bool = False  # a fresh set of tokens before every layer (VPT-deep)
    dropout: float = 0.1  # on the tokens, while training
    num_classes: int = 0  # default: the task's labels (init_labels)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.dropout) < 1.0:
            raise SoftPromptError(f"vpt dropout must be in [0, 1) (got {self.dropout})")


def new_head(features: int, classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's start values, seeded: uniform +-1/sqrt(features) for weight (K, F) and bias (K,)."""
    bound = 1.0 / math.sqrt(features)
    return (torch.empty(classes, features).uniform_(-bound, bound, generator=generator),
            torch.empty(classes).uniform_(-bound, bound, generator=generator))


def num_classes(config: MethodConfig) -> int:
    k = int(getattr(config, "num_classes", 0) or len(config.init_labels))
    if k < 1:
        raise SoftPromptError("an image prompt needs the task's classes: give the task's labels (method.init_labels) "
                              "or method.num_classes")
    return k


class VPT(Method):
    name = "vpt"
    prompt_kind = "patch_tokens"
    owns_head = True
    Config = VPTConfig

    def __init__(self, tokens: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor, config: VPTConfig):
        super().__init__(config)
        if tokens.ndim != 3:
            raise SoftPromptError(f"VPT tokens are (depth, P, H); got shape {tuple(tokens.shape)}")
        self.config.num_virtual_tokens = tokens.shape[1]
        self.config.num_classes = head_weight.shape[0]
        self.tokens = nn.Parameter(tokens.detach().float().clone())  # (D, P, H)
        self.head_weight = nn.Parameter(head_weight.detach().float().clone())  # (K, H)
        self.head_bias = nn.Parameter(head_bias.detach().float().clone())  # (K,)
        self.drop = nn.Dropout(float(config.dropout))

    @classmethod
    def build(cls, backbone: Any, config: VPTConfig) -> VPT:
        if backbone.kind not in ("vit", "detector"):
            raise SoftPromptError(f"vpt puts tokens into a vision transformer; backbone {backbone.name!r} is a "
                                  f"{backbone.kind!r} model (use pixel_prompt for any image model)")
        g = torch.Generator().manual_seed(int(config.seed))
        depth = backbone.num_layers if config.deep else 1
        H, p = backbone.hidden_size, backbone.patch_size
        bound = math.sqrt(6.0 / (3 * p * p + H))  # the paper's uniform Xavier over a patch's inputs
        tokens = torch.empty(depth, int(config.num_virtual_tokens), H).uniform_(-bound, bound, generator=g)
        classes = num_classes(config) + getattr(backbone, "head_extra_classes", 0)  # a detector's "no object"
        return cls(tokens, *new_head(H, classes, g), config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> VPT:
        cfg = VPTConfig.from_dict(config)
        return cls(require(tensors, "tokens", cls.name), require(tensors, "head.weight", cls.name),
                   require(tensors, "head.bias", cls.name), cfg)

    @property
    def hidden_size(self) -> int:
        return self.tokens.shape[-1]

    @property
    def depth(self) -> int:
        return self.tokens.shape[0]

    def check_backbone(self, backbone: Any) -> None:
        super().check_backbone(backbone)
        layers = getattr(backbone, "num_layers", None)
        if self.depth > 1 and layers is not None and self.depth != layers:
            raise SoftPromptError(f"a VPT-deep prompt for {self.depth} layers does not fit backbone {backbone.name!r} "
                                  f"with {layers} layers; train a prompt for this backbone")

    def describe(self) -> dict:
        return {**super().describe(), "depth": self.depth, "num_classes": self.head_weight.shape[0]}

    def forward(self) -> PatchPrompt:
        return PatchPrompt(self.drop(self.tokens), Head(self.head_weight, self.head_bias))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens.detach(), "head.weight": self.head_weight.detach(),
                "head.bias": self.head_bias.detach()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in (("tokens", self.tokens), ("head.weight", self.head_weight), ("head.bias", self.head_bias)):
            p.copy_(require(tensors, name, self.name))
