"""The architectures the fast path knows, by ``config.model_type``: where the decoder MLPs are, whether they are
gated (act(gate(x)) * up(x) -> down), and what the model does to lm_head's output before it calls it logits.

A model type not listed here runs the plain path (the model's own forward). A listed one is still checked when
the fast path is installed (``FastPath.install``): the head below applied to the final hidden states must give
the model's own logits on a probe batch, or the plain path runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _softcap(config, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def _divide_by_logits_scaling(config, logits: torch.Tensor) -> torch.Tensor:  # Granite
    return logits / config.logits_scaling


def _times_logit_scale(config, logits: torch.Tensor) -> torch.Tensor:  # Cohere
    return logits * config.logit_scale


@dataclass(frozen=True)
class Architecture:
    gated_mlp: bool  # layer.mlp has gate_proj, up_proj, down_proj, act_fn
    logits: Callable | None = None  # (config, lm_head output) -> the model's logits; None: lm_head's output as is


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gated_mlp=True),
    "mistral": Architecture(gated_mlp=True),
    "qwen2": Architecture(gated_mlp=True),
    "qwen3": Architecture(gated_mlp=True),
    "smollm3": Architecture(gated_mlp=True),
    "olmo2": Architecture(gated_mlp=True),
    "gemma": Architecture(gated_mlp=True),
    "gemma2": Architecture(gated_mlp=True, logits=_softcap),
    "gemma3_text": Architecture(gated_mlp=True, logits=_softcap),
    "granite": Architecture(gated_mlp=True, logits=_divide_by_logits_scaling),
    "cohere": Architecture(gated_mlp=True, logits=_times_logit_scale),
    "gpt2": Architecture(gated_mlp=False),
}


def architecture(model) -> Architecture | None:
    cfg = model.config.get_text_config()
    return ARCHITECTURES.get(getattr(cfg, "model_type", None))
