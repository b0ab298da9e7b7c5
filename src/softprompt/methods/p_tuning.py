"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): the prompt is produced by a small encoder (an MLP, or a
bidirectional LSTM followed by an MLP) from trainable embeddings. The encoder trains; its output is what a prompt
file holds (the encoder itself stays in the run's checkpoint, for --resume). The layers follow PEFT's PromptEncoder,
so a P_TUNING folder's collapsed embeddings mean the same thing here.
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

ENCODERS = ("mlp", "lstm")


@dataclass
class PTuningConfig(MethodConfig):
    encoder: str = "mlp"  # mlp | lstm (Liu et al. used a bi-LSTM + MLP; PEFT recommends the MLP)
    encoder_hidden: int | None = None  # the encoder's width (None: the backbone's hidden size, as PEFT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ENCODERS:
            raise SoftPromptError(f"p_tuning encoder must be one of {', '.join(ENCODERS)}, not {self.encoder!r}")


class _Encoder(nn.Module):
    def __init__(self, kind: str, width: int, hidden: int):
        super().__init__()
        self.lstm = None
        if kind == "lstm":
            self.lstm = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (P, H) -> (P, H)
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0][0]  # (P, 2 * hidden)
        return self.mlp(x)


class PTuning(Method):
    name = "p_tuning"
    prompt_kind = "embeddings"
    Config = PTuningConfig

    def __init__(self, embedding: torch.Tensor, config: PTuningConfig, encoded: bool = True):
        super().__init__(config)
        self.config.num_virtual_tokens = embedding.shape[0]
        H = embedding.shape[1]
        self.embedding = nn.Parameter(embedding.detach().float().clone())  # (P, H)
        self.encoder = _Encoder(config.encoder, H, config.encoder_hidden or H) if encoded else None

    @classmethod
    def build(cls, backbone: Any, config: PTuningConfig) -> PTuning:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.seed))  # the encoder's init, reproducible
            return cls(initial_embeddings(backbone, config), config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> PTuning:
        cfg = PTuningConfig.from_dict(config)
        if "embedding" in tensors:  # a checkpoint's state: the encoder too
            m = cls(tensors["embedding"], cfg)
            m.load_state_tensors(tensors)
            return m
        return cls(require(tensors, "prompt", cls.name), cfg, encoded=False)

    @property
    def hidden_size(self) -> int:
        return self.embedding.shape[1]

    def forward(self) -> EmbeddingPrompt:
        if self.encoder is None:
            return EmbeddingPrompt(self.embedding)
        return EmbeddingPrompt(self.encoder(self.embedding))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self().embeddings.detach()}
