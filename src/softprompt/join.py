"""Joins: where a method's virtual-token embeddings enter the backbone's input.

The prefix join puts the prompt in front of the input. With a prompt of P virtual tokens and an input of T
tokens (B rows), the backbone sees (B, P + T, H). Position ids follow the attention mask, so the prompt sits
at positions 0..P-1 and each row's first real token at P, whatever the padding side: a padded batch gives,
row by row, the logits each row gets alone. Outputs are cut back to the caller's T positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SoftPromptError

IGNORE_INDEX = -100


@dataclass
class Joined:
    inputs_embeds: torch.Tensor  # (B, P+T, H)
    attention_mask: torch.Tensor  # (B, P+T)
    position_ids: torch.Tensor  # (B, P+T)
    labels: torch.Tensor | None  # (B, P+T), IGNORE_INDEX on virtual positions


def input_positions(attention_mask: torch.Tensor, offset: int) -> torch.Tensor:
    """(B, T) positions of the input tokens: offset for each row's first real token, counting real tokens only."""
    return offset + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_mask(attention_mask: torch.Tensor) -> None:
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise SoftPromptError(f"empty input in row(s) {empty[:5]}: every row needs at least one token")


def prefix_join(prompt: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Joined:
    """Prepend prompt (P, H) to inputs_embeds (B, T, H); extend mask, positions and labels to match."""
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


def run_prompt(backbone, prompt: torch.Tensor):
    """Run the prompt alone (batch 1, positions 0..P-1) through a causal LM: per-layer (keys, values), each
    (1, heads, P, d), and the last prompt position's logits (1, V), which predict the first input token.
    Differentiable when the prompt requires grad."""
    P = prompt.shape[0]
    dev = backbone.device
    embeds = prompt.to(device=dev, dtype=backbone.dtype).unsqueeze(0)  # (1, P, H)
    out = backbone.forward(embeds, attention_mask=torch.ones(1, P, dtype=torch.long, device=dev),
                           position_ids=torch.arange(P, device=dev).unsqueeze(0), cache=backbone.new_cache(),
                           use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in out.cache.layers], out.logits[:, -1]


def expand_kv(layers: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
    """Batch-1 key/values viewed as `batch` rows (no copy; gradients sum back through the expand)."""
    return [(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in layers]


def strip_virtual(outputs, num_virtual: int, total: int):
    """Cut the first num_virtual positions from per-position outputs (logits, hidden states, attention queries)."""
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
    if getattr(outputs, "hidden_states", None) is not None:
        outputs["hidden_states"] = tuple(cut(h) for h in outputs.hidden_states)
    if getattr(outputs, "attentions", None) is not None:  # (B, heads, Q, K): queries cut, keys kept
        outputs["attentions"] = tuple(cut(a, dim=2) for a in outputs.attentions)
    return outputs


def truncate_to_fit(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                    labels: torch.Tensor | None = None):
    """Drop columns so that at most `keep` remain: from the left under left padding (keeps each row's end),
    from the right under right padding (keeps each row's start)."""
    if input_ids.shape[1] <= keep:
        return input_ids, attention_mask, labels
    left_padded = bool((attention_mask[:, -1] == 1).all()) and not bool((attention_mask[:, 0] == 1).all())
    sl = slice(input_ids.shape[1] - keep, None) if left_padded else slice(0, keep)
    return input_ids[:, sl], attention_mask[:, sl], None if labels is None else labels[:, sl]
