"""Prompt tuning (Lester et al. 2021): a (P, H) matrix of virtual-token embeddings, the only thing that trains."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..init import initialise
from ..prompts import EmbeddingPrompt
from .base import Method, MethodConfig, require

PromptTuningConfig = MethodConfig


def initial_embeddings(backbone: Any, config: MethodConfig) -> torch.Tensor:
    """(P, H) float32 start values from the config's initialiser (shared by the embedding-prompt methods)."""
    return initialise(backbone, config.num_virtual_tokens, config.init, text=config.init_text,
                      labels=config.init_labels, path=config.init_file, seed=config.seed)


class PromptTuning(Method):
    """Holds the prompt as a float32 parameter whatever the backbone dtype; the join casts it."""

    name = "prompt_tuning"
    prompt_kind = "embeddings"

    def __init__(self, weight: torch.Tensor, config: MethodConfig | None = None):
        if weight.ndim != 2:
            raise SoftPromptError(f"a prompt is a (P, H) matrix; got shape {tuple(weight.shape)}")
        super().__init__(config or MethodConfig(num_virtual_tokens=weight.shape[0]))
        self.config.num_virtual_tokens = weight.shape[0]
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())  # (P, H)

    @classmethod
    def build(cls, backbone: Any, config: MethodConfig) -> PromptTuning:
        return cls(initial_embeddings(backbone, config), config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> PromptTuning:
        return cls(require(tensors, "prompt", cls.name), MethodConfig.from_dict(config))

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> EmbeddingPrompt:
        return EmbeddingPrompt(self.weight)  # (P, H)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.weight.detach()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.weight.copy_(require(tensors, "prompt", self.name))
