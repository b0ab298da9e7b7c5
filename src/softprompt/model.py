"""PromptedModel: a frozen backbone plus a method, joined. Its parameters are the method's, nothing else."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbones import Backbone
from .errors import SoftPromptError
from .join import (
    check_mask,
    expand_kv,
    input_positions,
    prefix_join,
    run_prompt,
    strip_virtual,
    truncate_to_fit,
)


class PromptedModel(nn.Module):
    """Runs ``backbone(prefix_join(method(), embed(input_ids)))`` and returns outputs aligned with input_ids.

    The backbone is held as a plain attribute, not a submodule: ``parameters()``, ``state_dict()``, ``train()``,
    ``.to()`` and DDP see the prompt only, and the frozen model stays in eval mode while the prompt trains.
    """

    def __init__(self, backbone: Backbone, method: nn.Module, prompt_cache: bool = True):
        super().__init__()
        if method.hidden_size != backbone.hidden_size:
            raise SoftPromptError(
                f"prompt width {method.hidden_size} does not match backbone {backbone.name!r} hidden size "
                f"{backbone.hidden_size}; create the prompt for this backbone")
        self.backbone = backbone
        self.method = method
        # Causal LMs: run the prompt once per batch (batch 1) and give its key/values to every row as a cache,
        # instead of computing the same P positions B times. Same loss and gradient as the plain prefix join.
        self.prompt_cache = prompt_cache and backbone.kind == "causal_lm"

    @property
    def num_virtual_tokens(self) -> int:
        return self.method.num_virtual_tokens

    def check_length(self, num_tokens: int, extra: int = 0) -> None:
        limit = self.backbone.max_positions
        total = self.num_virtual_tokens + num_tokens + extra
        if limit is not None and total > limit:
            more = f" + {extra} new" if extra else ""
            raise SoftPromptError(
                f"input of {num_tokens} tokens{more} + {self.num_virtual_tokens} virtual tokens = {total} exceeds the "
                f"model's {limit} positions; shorten the input or pass truncate=True")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                truncate: bool = False, **kwargs: Any):
        if (input_ids is None) == (inputs_embeds is None):
            raise SoftPromptError("pass exactly one of input_ids or inputs_embeds")
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if T == 0:
            raise SoftPromptError("empty input: every row needs at least one token")
        limit = self.backbone.max_positions
        if truncate and limit is not None and self.num_virtual_tokens + T > limit:
            if input_ids is None:
                raise SoftPromptError("truncate=True needs input_ids (embeddings cannot be re-padded)")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            input_ids, attention_mask, labels = truncate_to_fit(
                input_ids, attention_mask, limit - self.num_virtual_tokens, labels)
            T = input_ids.shape[1]
        self.check_length(T)
        if inputs_embeds is None:
            inputs_embeds = self.backbone.embed(input_ids)
        soft = self.method()  # (P, H)
        if self.prompt_cache and soft.shape[0] > 0:
            return self._forward_with_prompt_cache(soft, inputs_embeds, attention_mask, labels, **kwargs)
        joined = prefix_join(soft, inputs_embeds, attention_mask, labels)
        if self.backbone.kind == "module":
            out = self.backbone.forward(joined.inputs_embeds)
        else:
            out = self.backbone.forward(joined.inputs_embeds, attention_mask=joined.attention_mask,
                                        position_ids=joined.position_ids, labels=joined.labels, **kwargs)
        return strip_virtual(out, self.num_virtual_tokens, joined.inputs_embeds.shape[1])

    def _forward_with_prompt_cache(self, soft, inputs_embeds, attention_mask, labels, **kwargs):
        from .generation import prompt_kv

        bb = self.backbone
        B, T, _ = inputs_embeds.shape
        P = soft.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device)
        check_mask(attention_mask)
        if torch.is_grad_enabled() and soft.requires_grad:
            layers, last = run_prompt(bb, soft)  # (1, heads, P, d) per layer, with grad
        else:
            layers, last = prompt_kv(bb, soft)  # computed once per prompt content, reused
        full_mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device),
                               attention_mask], dim=1)
        out = bb.forward(inputs_embeds, attention_mask=full_mask, position_ids=input_positions(attention_mask, P),
                         cache=bb.new_cache(expand_kv(layers, B)), use_cache=True, **kwargs)
        if labels is not None:  # causal LM loss, the last virtual position predicting the first token too
            logits = torch.cat([last.unsqueeze(1).expand(B, 1, -1), out.logits[:, :-1]], dim=1).float()
            out["loss"] = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                      ignore_index=-100)
        return out
