"""The join protocol and its registry."""

from __future__ import annotations

from typing import Any, ClassVar

JOINS: dict[tuple[str, str], Join] = {}


def register(cls: type[Join]) -> type[Join]:
    """Class decorator: the join for (cls.prompt_kind, cls.backbone_kind)."""
    JOINS[(cls.prompt_kind, cls.backbone_kind)] = cls()
    return cls


class Join:
    """Puts a prompt of one kind into a backbone of one kind. Stateless: one instance serves every model."""

    prompt_kind: ClassVar[str]
    backbone_kind: ClassVar[str]

    def forward(self, model: Any, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                truncate: bool = False, **kwargs: Any) -> Any:
        """The backbone's outputs for the input with the prompt in, aligned with the caller's positions."""
        raise NotImplementedError

    def hidden_states(self, model: Any, input_ids, attention_mask=None, last_only: bool = False):
        """(states, last): what the rows' forward gives before the LM head (final hidden states on the fast path,
        logits otherwise: ``model.head()`` turns either into logits), and the last prompt position's state (which
        predicts each row's first token; None when nothing does)."""
        raise NotImplementedError(f"{type(self).__name__} has no scoring path (no language-model head)")

    def classify(self, model: Any, pixel_values):
        """(B, K) logits of the prompt's task for images (image prompts, which carry their head)."""
        raise NotImplementedError(f"{type(self).__name__} does not classify images")
