"""The embedding prompt in front of the input embeddings of a plain module (any ``nn.Module`` that maps (B, T, H)
embeddings to outputs): concatenated, outputs cut back to the caller's positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SoftPromptError
from .base import Join, register
from .causal import IGNORE_INDEX, check_mask, input_positions


@dataclass
class Joined:
    inputs_embeds: torch.Tensor  # (B, P+T, H)
    attention_mask: torch.Tensor  # (B, P+T)
    position_ids: torch.Tensor  # (B, P+T)
    labels: torch.Tensor | None  # (B, P+T), IGNORE_INDEX on virtual positions


def prefix_join(prompt: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Joined:
    """Prepend prompt (P, H) to inputs_embeds (B, T, H); extend mask, positions and labels to match. Position ids
    follow the mask: the prompt at 0..P-1, each row's first real token at P, whatever the padding side."""
    B, T, H = inputs_embeds.shape
    P = prompt.shape[0]
    if prompt.shape[-1] != H:
        raise SoftPromptError(f"prompt width {prompt.shape[-1]} does not match the backbone's hidden size {H}")
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device)
    check_mask(attention_mask)
    virtual = prompt.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype).unsqueeze(0).expand(B, P, H)
    ones = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
    positions = torch.arange(P, device=attention_mask.device).unsqueeze(0).expand(B, P)
    return Joined(
        inputs_embeds=torch.cat([virtual, inputs_embeds], dim=1),
        attention_mask=torch.cat([ones, attention_mask], dim=1),
        position_ids=torch.cat([positions, input_positions(attention_mask, P)], dim=1),
        labels=None if labels is None else torch.cat(
            [torch.full((B, P), IGNORE_INDEX, dtype=labels.dtype, device=labels.device), labels], dim=1),
    )


def strip_virtual(outputs, num_virtual: int, total: int):
    """Cut the first num_virtual positions from per-position outputs (a tensor, or logits / hidden states)."""
    if num_virtual == 0:
        return outputs

    def cut(x, dim=1):
        if isinstance(x, torch.Tensor) and x.ndim > dim and x.shape[dim] == total:
            return x.narrow(dim, num_virtual, total - num_virtual)
        return x

    if isinstance(outputs, torch.Tensor):
        return cut(outputs)
    for key in ("logits", "last_hidden_state"):
        if getattr(outputs, key, None) is not None:
            outputs[key] = cut(outputs[key])
    return outputs


@register
class EmbeddingsIntoModule(Join):
    prompt_kind = "embeddings"
    backbone_kind = "module"

    def forward(self, model, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                truncate=False, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = model.backbone.embed(input_ids)
        prompt = model.method().embeddings  # (P, H)
        joined = prefix_join(prompt, inputs_embeds, attention_mask, labels)
        return strip_virtual(model.backbone.forward(joined.inputs_embeds), prompt.shape[0],
                             joined.inputs_embeds.shape[1])
