"""A task head beside a text method's prompt: on a text encoder a classification task is a linear head on the
pooled final states ([CLS] or the mean of the real tokens) that trains with the prompt and is stored in the prompt
file (``head.weight``, ``head.bias``; the pooling in the file's metadata).

``Headed`` wraps any method whose prompt kind can carry a head (embeddings, key/value): the prompt it returns is
the wrapped method's with the head attached, its file and checkpoint tensors are the wrapped method's plus the
head's. The wrapped method is unchanged: one wrapper, every text method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..prompts import Head
from .base import Method, require
from .vpt import new_head

HEAD_TENSORS = ("head.weight", "head.bias")


class Headed(Method):
    """`inner`'s prompt with a linear head (K, H) on pooled features. Its name, kind and config are `inner`'s."""

    def __init__(self, inner: Method, weight: torch.Tensor, bias: torch.Tensor, pooling: str = "cls"):
        if pooling not in ("cls", "mean"):
            raise SoftPromptError(f"unknown pooling {pooling!r} for a task head; use cls or mean")
        super().__init__(inner.config)
        self.inner = inner
        self.name, self.prompt_kind, self.Config = inner.name, inner.prompt_kind, inner.Config
        self.pooling = pooling
        self.head_weight = nn.Parameter(weight.detach().float().clone())  # (K, H)
        self.head_bias = nn.Parameter(bias.detach().float().clone())  # (K,)

    @classmethod
    def create_for(cls, inner: Method, backbone: Any, classes: int, seed: int, pooling: str | None = None) -> Headed:
        """A new head (nn.Linear's start values, seeded) for `classes` labels on `backbone`'s features."""
        g = torch.Generator().manual_seed(int(seed) + 1)
        weight, bias = new_head(backbone.hidden_size, classes, g)
        return cls(inner, weight, bias, pooling or getattr(backbone, "pooling", "cls")).to(backbone.device)

    @classmethod
    def from_tensors_of(cls, inner_cls: type[Method], tensors: dict[str, torch.Tensor], config: dict | None,
                        pooling: str = "cls") -> Headed:
        rest = {k: v for k, v in tensors.items() if k not in HEAD_TENSORS}
        inner = inner_cls.from_tensors(rest, config)
        weight, bias = (require(tensors, k, inner.name) for k in HEAD_TENSORS)
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise SoftPromptError(f"a task head is weight (K, H) and bias (K,); got {tuple(weight.shape)} and "
                                  f"{tuple(bias.shape)}")
        return cls(inner, weight, bias, pooling)

    @property
    def num_virtual_tokens(self) -> int:
        return self.inner.num_virtual_tokens

    @property
    def hidden_size(self) -> int:
        return self.inner.hidden_size

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]

    def check_backbone(self, backbone: Any) -> None:
        self.inner.check_backbone(backbone)
        if self.head_weight.shape[1] != backbone.hidden_size:
            raise SoftPromptError(f"this prompt's task head reads {self.head_weight.shape[1]} features but backbone "
                                  f"{backbone.name!r} has hidden size {backbone.hidden_size}")

    def describe(self) -> dict:
        return {**self.inner.describe(), "num_classes": self.num_classes, "pooling": self.pooling}

    def config_dict(self) -> dict:
        return self.inner.config_dict()

    def forward(self):
        return dataclasses.replace(self.inner(), head=Head(self.head_weight, self.head_bias, self.pooling))

    def _head(self) -> dict[str, torch.Tensor]:
        return {"head.weight": self.head_weight.detach(), "head.bias": self.head_bias.detach()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.tensors(), **self._head()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.state_tensors(), **self._head()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_tensors({k: v for k, v in tensors.items() if k not in HEAD_TENSORS})
        self.head_weight.copy_(require(tensors, "head.weight", self.name))
        self.head_bias.copy_(require(tensors, "head.bias", self.name))
