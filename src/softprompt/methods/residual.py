"""Residual prompt tuning (Razdaibiedina et al. 2023): the prompt passes through a shared bottleneck MLP with a skip
connection while training, P + LN(W2 relu(W1 P)); the MLP is dropped after training (the file holds the result).

The LayerNorm's gain starts at zero, so the reparameterised prompt starts exactly at its initialisation (a
LayerNorm output has unit scale, far larger than the input embeddings of small models: added at full size it
would bury the class-label or vocabulary init). The MLP learns from the first step on (the gain's gradient is not
zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..prompts import EmbeddingPrompt
from .base import Method, MethodConfig, require
from .prompt_tuning import initial_embeddings


@dataclass
class ResidualConfig(MethodConfig):
    bottleneck: int = 128  # hidden width of the shared MLP (the paper's bottleneck)

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.bottleneck) < 1:
            raise SoftPromptError(f"residual bottleneck must be >= 1 (got {self.bottleneck})")


class ResidualPromptTuning(Method):
    name = "residual"
    prompt_kind = "embeddings"
    Config = ResidualConfig

    def __init__(self, weight: torch.Tensor, config: ResidualConfig, reparameterized: bool = True):
        super().__init__(config)
        self.config.num_virtual_tokens = weight.shape[0]
        self.weight = nn.Parameter(weight.detach().float().clone())  # (P, H)
        H = weight.shape[1]
        self.mlp = self.norm = None
        if reparameterized:
            self.mlp = nn.Sequential(nn.Linear(H, config.bottleneck), nn.ReLU(), nn.Linear(config.bottleneck, H))
            self.norm = nn.LayerNorm(H)
            nn.init.zeros_(self.norm.weight)

    @classmethod
    def build(cls, backbone: Any, config: ResidualConfig) -> ResidualPromptTuning:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.seed))  # the MLP's init, reproducible like the prompt's
            return cls(initial_embeddings(backbone, config), config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> ResidualPromptTuning:
        cfg = ResidualConfig.from_dict(config)
        if "weight" in tensors:  # a checkpoint's state: the MLP too
            m = cls(tensors["weight"], cfg)
            m.load_state_tensors(tensors)
            return m
        return cls(require(tensors, "prompt", cls.name), cfg, reparameterized=False)

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> EmbeddingPrompt:
        x = self.weight  # (P, H)
        if self.mlp is not None:
            x = x + self.norm(self.mlp(x))
        return EmbeddingPrompt(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self().embeddings.detach()}
