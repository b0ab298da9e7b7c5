"""Joins into a text encoder (BERT family). The prompt goes in front of every row:

- an embedding prompt (prompt tuning, P-tuning, residual) as P virtual tokens before the row's [CLS], through the
  encoder's embedding module like any token (positions 0..P-1, the row's own tokens from P on);
- a key/value prompt (P-tuning v2 / deep prompts, prefix tuning) as keys and values at every layer that the row's
  tokens attend to (through the encoder's own cache); the row keeps its positions 0..T-1.

Position ids follow the attention mask, so a row gives the same outputs alone or in a padded batch (either side).
A classification task is scored one of two ways: through the prompt's task head on pooled final states
(``classify_tokens``), or, for a ``{mask}`` template on a model with a masked-LM head, through that head at each
row's mask token (``hidden_states(last_only=True)`` gives those logits, so the one scorer applies unchanged).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SoftPromptError
from ..prompts import EmbeddingPrompt, KVPrompt
from .base import Join, register
from .causal import check_mask, input_positions
from .module import prefix_join
from .vision import apply_head


class EncoderJoin(Join):
    backbone_kind = "encoder"

    def states(self, backbone: Any, prompt, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) final states of the rows' own tokens with the prompt in."""
        raise NotImplementedError

    def _prompt(self, model: Any):
        return model.method()

    def forward(self, model, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                truncate=False, **kwargs):
        if input_ids is None:
            raise SoftPromptError("an encoder prompt takes input_ids (the pooled head and the mask token need them)")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.states(model.backbone, self._prompt(model), input_ids, mask)

    def hidden_states(self, model, input_ids, attention_mask=None, last_only: bool = False):
        """The masked-LM logits at each row's mask token, (B, 1, V) (``last_only``: what the scorer asks for)."""
        bb = model.backbone
        if not last_only:
            raise SoftPromptError(f"{bb.name!r} is a text encoder: it scores label words at a {{mask}} token or "
                                  "classifies through a task head; it does not generate text")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        at = mask_positions(bb, input_ids)
        states = self.states(bb, self._prompt(model), input_ids, mask)
        picked = states[torch.arange(states.shape[0], device=states.device), at]  # (B, H)
        return bb.mlm_logits(picked).unsqueeze(1), None

    def classify_tokens(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of the prompt's task head on the pooled final states of the rows' own tokens."""
        bb = model.backbone
        prompt = self._prompt(model)
        if prompt.head is None:
            raise SoftPromptError(f"this {model.method.name} prompt has no task head; train it on a classification "
                                  "task without {mask} (or score a {mask} template through the masked-LM head)")
        states = self.states(bb, prompt, input_ids, attention_mask)
        return apply_head(prompt.head, bb.pool(states, attention_mask, prompt.head.pooling))


def mask_positions(backbone: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """(B,) each row's (last) mask token column."""
    mask_id = backbone.mask_token_id
    if mask_id is None:
        raise SoftPromptError(f"{backbone.name!r} has no mask token; drop {{mask}} from the template")
    hits = input_ids == mask_id
    missing = (~hits.any(1)).nonzero().flatten().tolist()
    if missing:
        raise SoftPromptError(f"row(s) {missing[:5]} hold no {backbone.tokenizer.mask_token} token; put {{mask}} in "
                              "the template where the label word goes")
    T = input_ids.shape[1]
    return T - 1 - hits.flip(1).long().argmax(1)


@register
class EmbeddingsIntoEncoder(EncoderJoin):
    prompt_kind = "embeddings"

    def states(self, backbone, prompt: EmbeddingPrompt, input_ids, attention_mask):
        joined = prefix_join(prompt.embeddings, backbone.embed(input_ids), attention_mask)  # positions from the mask
        out = backbone.forward(joined.inputs_embeds, joined.attention_mask, joined.position_ids)
        return out[:, prompt.num_virtual_tokens:]


@register
class KVIntoEncoder(EncoderJoin):
    prompt_kind = "kv"

    def states(self, backbone, prompt: KVPrompt, input_ids, attention_mask):
        check_mask(attention_mask)
        embeds = backbone.embed(input_ids)
        B = embeds.shape[0]
        P = prompt.num_virtual_tokens
        positions = input_positions(attention_mask, 0)
        if P == 0:
            return backbone.forward(embeds, attention_mask, positions)
        kv = prompt.kv.to(device=embeds.device, dtype=embeds.dtype)  # (L, 2, heads, P, d)
        layers = [(k.unsqueeze(0).expand(B, -1, -1, -1), v.unsqueeze(0).expand(B, -1, -1, -1)) for k, v in kv]
        ones = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
        return backbone.forward(embeds, torch.cat([ones, attention_mask], 1), positions, prefix=layers)
