"""CLIP context optimisation. CoOp (Zhou et al. 2022): M learnable context vectors take the place of "a photo of a"
in front of each class name in CLIP's text encoder, [SOS][ctx x M][class name][.][EOS]; one set for every class
(unified) or one per class (class-specific). The class's text feature is read at the end-of-text token; logits are
CLIP's scale times the cosine of image and text features. CoCoOp (Zhou et al. 2022b): a small meta-network
(Linear -> ReLU -> Linear, width / 16 in the middle) turns each image's features into a shift of every context
vector, so the text side is computed per image.

Context starts from the token embeddings of ``init_text`` ("a photo of a", the paper's) when it has M tokens, else
normal with std 0.02 (the paper's random init); the meta-network's last layer starts at zero (CoCoOp starts as
CoOp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..prompts import ContextPrompt
from .base import Method, MethodConfig, require


@dataclass
class CoOpConfig(MethodConfig):
    num_virtual_tokens: int = 4
    init: str = "text"  # text (init_text's token embeddings; any text-model init means this) | random (std 0.02)
    init_text: str | None = "a photo of a"
    class_specific: bool = False  # a context per class (CSC) instead of one for all
    conditional: bool = False  # CoCoOp: an image-conditioned shift from a meta-network


class CoOp(Method):
    name = "coop"
    prompt_kind = "context"
    Config = CoOpConfig

    def __init__(self, ctx: torch.Tensor, class_names: list[str], config: CoOpConfig,
                 meta: dict[str, torch.Tensor] | None = None):
        super().__init__(config)
        if ctx.ndim not in (2, 3) or (ctx.ndim == 3 and ctx.shape[0] != len(class_names)):
            raise SoftPromptError(f"a context is (M, H) or (classes, M, H); got {tuple(ctx.shape)} for "
                                  f"{len(class_names)} classes")
        self.config.num_virtual_tokens = ctx.shape[-2]
        self.config.init_labels = list(class_names)
        self.class_names = tuple(class_names)
        self.ctx = nn.Parameter(ctx.detach().float().clone())
        self.meta = None
        if meta is not None:
            d, h = meta["meta.0.weight"].shape[1], ctx.shape[-1]
            self.meta = nn.Sequential(nn.Linear(d, meta["meta.0.weight"].shape[0]), nn.ReLU(),
                                      nn.Linear(meta["meta.0.weight"].shape[0], h))
            with torch.no_grad():
                for k, v in meta.items():
                    dict(self.meta.named_parameters())[k[len("meta."):]].copy_(v)

    @classmethod
    def build(cls, backbone: Any, config: CoOpConfig) -> CoOp:
        if backbone.kind != "clip":
            raise SoftPromptError(f"{cls.name} puts context into CLIP's text encoder; backbone {backbone.name!r} is a "
                                  f"{backbone.kind!r} model")
        names = list(config.init_labels)
        if not names:
            raise SoftPromptError(f"{cls.name} needs the class names (the task's labels, method.init_labels)")
        M, H = int(config.num_virtual_tokens), backbone.hidden_size
        g = torch.Generator().manual_seed(int(config.seed))
        ctx = torch.empty(M, H).normal_(0, 0.02, generator=g)
        if config.init != "random":  # text (also a text model's default inits): "a photo of a" unless given
            ids = backbone.tokenizer(config.init_text or "a photo of a", add_special_tokens=False)["input_ids"]
            if len(ids) == M:  # the paper: "a photo of a" for M = 4; otherwise random
                ctx = backbone.token_embedding.weight.detach()[torch.tensor(ids)].float().cpu().clone()
        if config.class_specific:
            ctx = ctx.unsqueeze(0).repeat(len(names), 1, 1)
        meta = None
        if config.conditional:
            d = backbone.feature_size
            mid = max(1, d // 16)
            w1 = torch.empty(mid, d).uniform_(-d ** -0.5, d ** -0.5, generator=g)
            meta = {"meta.0.weight": w1, "meta.0.bias": torch.zeros(mid), "meta.2.weight": torch.zeros(H, mid),
                    "meta.2.bias": torch.zeros(H)}
        return cls(ctx, names, config, meta)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> CoOp:
        cfg = CoOpConfig.from_dict(config)
        meta = {k: v for k, v in tensors.items() if k.startswith("meta.")} or None
        return cls(require(tensors, "ctx", cls.name), list(cfg.init_labels), cfg, meta)

    @property
    def hidden_size(self) -> int:
        return self.ctx.shape[-1]

    def check_backbone(self, backbone: Any) -> None:
        super().check_backbone(backbone)
        if self.meta is not None and getattr(backbone, "feature_size", None) != self.meta[0].in_features:
            raise SoftPromptError(f"this CoCoOp meta-network reads {self.meta[0].in_features} image features; backbone "
                                  f"{backbone.name!r} gives {getattr(backbone, 'feature_size', None)}")

    def describe(self) -> dict:
        return {**super().describe(), "num_classes": len(self.class_names), "conditional": self.meta is not None}

    def forward(self) -> ContextPrompt:
        meta = None if self.meta is None else (self.meta[0].weight, self.meta[0].bias, self.meta[2].weight,
                                                self.meta[2].bias)
        return ContextPrompt(self.ctx, self.class_names, meta)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"ctx": self.ctx.detach()}
        if self.meta is not None:
            out.update({f"meta.{k}": v.detach() for k, v in self.meta.named_parameters()})
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ctx.copy_(require(tensors, "ctx", self.name))
        if self.meta is not None:
            for k, p in self.meta.named_parameters():
                p.copy_(require(tensors, f"meta.{k}", self.name))


@dataclass
class CoCoOpConfig(CoOpConfig):
    conditional: bool = True


class CoCoOp(CoOp):
    """CoOp with the image-conditioned meta-network on (``conditional: true``)."""

    name = "cocoop"
    Config = CoCoOpConfig
