"""Prefix tuning (Li & Liang 2021) and P-tuning v2 / deep prompts (Liu et al. 2022): trainable keys and values at
every attention layer, which the input attends to as if P earlier tokens had produced them.

- ``prefix_tuning``: the keys and values come from an MLP over (P, H) trainable embeddings while training
  (Li & Liang's reparameterisation: Linear(H, 512), tanh, Linear(512, L * 2 * kv_heads * head_dim)); the MLP is
  dropped after training: a prompt file holds the per-layer tensors only (the MLP stays in the run's checkpoint,
  for --resume).
- ``p_tuning_v2``: the per-layer keys and values themselves are the parameters (no reparameterisation), started
  from the keys and values that the initialiser's tokens (vocabulary, label words, text) produce in the backbone.

The layout is the backbone's attention layout, (L, 2, kv_heads, P, head_dim): grouped-query models get their
key/value head count, not the query head count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..prompts import KVPrompt
from .base import Method, MethodConfig, require
from .prompt_tuning import initial_embeddings


@dataclass
class PrefixTuningConfig(MethodConfig):
    reparameterize: bool = True  # Li & Liang: an MLP over embeddings while training, dropped after
    encoder_hidden: int | None = None  # the MLP's width (None: 512, Li & Liang's)
    # the backbone's attention layout, filled in when the prompt is created (checked when it is loaded)
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None


@dataclass
class DeepPromptConfig(PrefixTuningConfig):
    reparameterize: bool = False  # P-tuning v2: the per-layer tensors are the parameters


class PrefixTuning(Method):
    name = "prefix_tuning"
    prompt_kind = "kv"
    Config = PrefixTuningConfig

    def __init__(self, config: PrefixTuningConfig, kv: torch.Tensor | None = None,
                 embedding: torch.Tensor | None = None):
        """Either `kv` (L, 2, kv_heads, P, head_dim): the tensors themselves train (or a collapsed file); or
        `embedding` (P, H): the reparameterisation trains."""
        super().__init__(config)
        L, h, d = config.layers, config.kv_heads, config.head_dim
        self.kv = self.embedding = self.mlp = None
        if kv is not None:
            self.kv = nn.Parameter(kv.detach().float().clone())
            self.config.layers, _, self.config.kv_heads, self.config.num_virtual_tokens, self.config.head_dim = \
                kv.shape
        else:
            width = config.encoder_hidden or 512
            self.embedding = nn.Parameter(embedding.detach().float().clone())  # (P, H)
            self.mlp = nn.Sequential(nn.Linear(embedding.shape[1], width), nn.Tanh(),
                                     nn.Linear(width, L * 2 * h * d))
            self.config.num_virtual_tokens = embedding.shape[0]

    @classmethod
    def build(cls, backbone: Any, config: PrefixTuningConfig) -> PrefixTuning:
        layout = backbone.kv_layout()
        if layout is None:
            raise SoftPromptError(f"{cls.name} needs a backbone with attention layers to put keys and values in; "
                                  f"{backbone.name!r} has none: use prompt_tuning")
        config.layers, config.kv_heads, config.head_dim = layout
        config.hidden_size = backbone.hidden_size
        embeds = initial_embeddings(backbone, config)  # (P, H)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.seed))  # the MLP's init, reproducible
            if config.reparameterize:
                return cls(config, embedding=embeds)
        with torch.no_grad():  # start from the keys and values the initialiser's tokens produce
            layers = backbone.prefix_states(embeds.to(backbone.device))[0]
        kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers]).float().cpu()  # (L, 2, h, P, d)
        return cls(config, kv=kv)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> PrefixTuning:
        cfg = cls.Config.from_dict(config)
        if "embedding" in tensors:  # a checkpoint's state with the reparameterisation
            if None in (cfg.layers, cfg.kv_heads, cfg.head_dim):
                raise SoftPromptError("a reparameterised prefix state needs its layout (layers, kv_heads, head_dim) "
                                      "in the method config")
            m = cls(cfg, embedding=tensors["embedding"])
            m.load_state_tensors(tensors)
            return m
        kv = require(tensors, "kv", cls.name)
        if kv.ndim != 5 or kv.shape[1] != 2:
            raise SoftPromptError(f"a {cls.name} prompt's 'kv' is (layers, 2, kv_heads, P, head_dim); got "
                                  f"{tuple(kv.shape)}")
        return cls(cfg, kv=kv)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size or 0)

    def layout(self) -> tuple[int, int, int]:
        return int(self.config.layers), int(self.config.kv_heads), int(self.config.head_dim)

    def check_backbone(self, backbone: Any) -> None:
        theirs = backbone.kv_layout()
        if theirs is None or tuple(theirs) != self.layout():
            L, h, d = self.layout()
            have = "no attention layers" if theirs is None else \
                f"{theirs[0]} layers x {theirs[1]} key/value heads x {theirs[2]} dims"
            raise SoftPromptError(
                f"{self.name} prompt is for {L} layers x {h} key/value heads x {d} dims but backbone "
                f"{backbone.name!r} has {have}; create the prompt for this backbone")

    def describe(self) -> dict:
        L, h, d = self.layout()
        return {**super().describe(), "layers": L, "kv_heads": h, "head_dim": d}

    def forward(self) -> KVPrompt:
        if self.kv is not None:
            return KVPrompt(self.kv)
        L, h, d = self.layout()
        P = self.embedding.shape[0]
        flat = self.mlp(self.embedding)  # (P, L * 2 * h * d)
        return KVPrompt(flat.view(P, L, 2, h, d).permute(1, 2, 3, 0, 4))  # (L, 2, h, P, d)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"kv": self().kv.detach().contiguous()}


class DeepPrompt(PrefixTuning):
    name = "p_tuning_v2"
    Config = DeepPromptConfig
