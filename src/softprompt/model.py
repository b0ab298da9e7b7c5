"""PromptedModel: a frozen backbone + a method + the join for their kinds. Its parameters are the method's.

It branches on neither the method nor the backbone: ``get_join(method.prompt_kind, backbone.kind)`` does the
work. ``MixedPromptedModel`` is the same view for rows that each have their own prompt (serving, mixed batches).
Both offer the two entry points the scorer (``softprompt.scoring``) and the losses use: ``hidden_states`` (what
the rows' forward gives before the LM head) and ``head``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import scoring
from .backbones import Backbone
from .errors import SoftPromptError
from .joins import get_join, run_rows, stack_prefixes, truncate_to_fit
from .prompts import Prompt, as_prompt
from .runtime import runtime


class PromptedModel(nn.Module):
    """``model(input_ids, attention_mask, labels=...)`` runs the backbone with the method's prompt in and returns
    outputs aligned with input_ids (logits, loss). The backbone is a plain attribute, not a submodule:
    ``parameters()``, ``state_dict()``, ``train()``, ``.to()`` and DDP see the method only, and the frozen model
    stays in eval mode while the prompt trains."""

    def __init__(self, backbone: Backbone, method: nn.Module, activation_checkpointing: bool = False):
        super().__init__()
        method.check_backbone(backbone)
        self.backbone = backbone
        self.method = method
        self.join = get_join(method.prompt_kind, backbone.kind)
        self.runtime = runtime(backbone)
        # while training: keep only each decoder layer's input and recompute the layer in backward
        self.activation_checkpointing = activation_checkpointing

    @property
    def num_virtual_tokens(self) -> int:
        return self.method.num_virtual_tokens

    @property
    def lean(self) -> bool:
        """True on the fast path: hidden_states() gives final hidden states and head() applies the LM head."""
        return self.runtime.lean

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
        return self.join.forward(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                 inputs_embeds=inputs_embeds, **kwargs)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(states (B, T, .), last (1, .) or None), aligned with input_ids: on the fast path final hidden states
        (no logits computed), else logits; ``head()`` turns either into logits. `last` is the last prompt
        position's, which predicts each row's first token.

        last_only=True (classification: only the answer column is scored): states are (B, 1, .) and less is
        computed for them (the last layer's MLP at that column only; the first tokens every row shares computed
        once, after the prompt: `last` is then not the prompt's)."""
        return self.join.hidden_states(self, input_ids, attention_mask, last_only)

    def head(self, states: torch.Tensor, rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Logits from hidden_states()' states: over the vocabulary, or over `rows` only (a verbalizer's words)."""
        return self.runtime.head(states, rows)

    def take(self, index: torch.Tensor) -> PromptedModel:
        """The view for a subset or repetition of rows (one prompt for all rows: the same)."""
        return self

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of the prompt's task for normalised images (B, C, S, S): image prompts, with their head."""
        return self.join.classify(self, pixel_values)

    def classify_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of the prompt's task head on a text encoder's pooled states."""
        if not hasattr(self.join, "classify_tokens"):
            raise SoftPromptError(f"a {self.method.prompt_kind!r} prompt on a {self.backbone.kind!r} backbone has no "
                                  "task head; classification is scored through the language-model head")
        return self.join.classify_tokens(self, input_ids, attention_mask)

    def detect(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A detector's (logits (B, N, K + 1), boxes (B, N, 4)) per detection token, the prompt's class head."""
        if not hasattr(self.join, "detect"):
            raise SoftPromptError(f"a {self.method.prompt_kind!r} prompt on a {self.backbone.kind!r} backbone does "
                                  "not detect objects; load a detector (YOLOS)")
        return self.join.detect(self, pixel_values)

    def target_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    reduction: str = "sum") -> torch.Tensor:
        """Causal LM cross-entropy of labels (B, T) (-100: no loss), the LM head at the target positions only."""
        return scoring.target_loss(self, input_ids, attention_mask, labels, reduction)

    def label_scores(self, input_ids, attention_mask, verbalizer, normalize=True, pad_id=0):
        """Label log-likelihoods at the answer position (``softprompt.scoring.label_scores``)."""
        return scoring.label_scores(self, input_ids, attention_mask, verbalizer, normalize, pad_id)


class MixedPromptedModel:
    """Rows that each have their own prompt (or none) on one causal LM: each prompt's prefix comes from the
    runtime's cache, and the rows run in one forward on the stacked prefixes. With ``grad`` (a multi-task training
    step) the prefixes are computed afresh with gradient, each flowing back to its own prompt."""

    def __init__(self, backbone: Backbone, prompts: list[Prompt | None], reuse_prompt_cache: bool = True,
                 grad: bool = False):
        self.backbone = backbone
        self.runtime = runtime(backbone)
        self.prompts = [as_prompt(p) for p in prompts]
        self.reuse_prompt_cache = reuse_prompt_cache
        self.grad = grad

    @property
    def lean(self) -> bool:
        return self.runtime.lean

    def prefixes(self) -> list:
        """Each row's own prefix (a batch-1 `Prefix`, the same object for rows of one prompt; EMPTY for a row
        without a prompt)."""
        rt = self.runtime
        seen: dict[int, Any] = {}
        for p in self.prompts:
            if p is not None and id(p) not in seen:
                join = get_join(p.kind, self.backbone.kind)
                if self.grad:
                    seen[id(p)] = join.prefix(rt, p, grad=True)
                elif self.reuse_prompt_cache:
                    seen[id(p)] = join.prefix(rt, p)
                else:  # the benchmark's baseline: recomputed for every batch
                    with torch.no_grad(), rt.engaged():
                        seen[id(p)] = join.compute_prefix(rt, p)
        from .joins.causal import EMPTY

        return [EMPTY if p is None else seen[id(p)] for p in self.prompts]

    def prefix(self):
        prefixes = self.prefixes()
        if prefixes[0].length and all(p is prefixes[0] for p in prefixes):
            return prefixes[0]  # one prompt for every row: batch 1, expanded (a view)
        return stack_prefixes(prefixes)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      last_only: bool = False):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            prefix = self.prefix()
            states = run_rows(self.runtime, prefix, self.backbone.embed(input_ids), attention_mask,
                              last_only=last_only)
        return states, prefix.last

    def head(self, states: torch.Tensor, rows=None) -> torch.Tensor:
        return self.runtime.head(states, rows)

    @torch.no_grad()
    def classify(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Row i's logits (K_i,) under its own image prompt: rows of compatible prompts share a forward."""
        from .joins import classify_mixed

        return classify_mixed(self.backbone, self.prompts, pixel_values)

    @torch.no_grad()
    def detect(self, pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's (logits (N, K_i + 1), boxes (N, 4)) under its own detection prompt, in shared forwards."""
        from .joins import detect_mixed

        return detect_mixed(self.backbone, self.prompts, pixel_values)

    def take(self, index: torch.Tensor) -> MixedPromptedModel:
        return MixedPromptedModel(self.backbone, [self.prompts[i] for i in index.tolist()], self.reuse_prompt_cache,
                                  self.grad)

    def label_scores(self, input_ids, attention_mask, verbalizers, normalize=True, pad_id=0):
        return scoring.label_scores(self, input_ids, attention_mask, verbalizers, normalize, pad_id)
