"""Classification scoring for a mixed-task batch: rows with different prompts (of any kind) and verbalizers in one
forward, through the one scorer (``softprompt.scoring``)."""

from __future__ import annotations

from typing import Any

import torch

from ..model import MixedPromptedModel
from ..scoring import label_scores
from ..tasks.encode import left_pad


@torch.no_grad()
def score_mixed(backbone: Any, requests: list[tuple[Any, list[int], Any]],
                reuse_prompt_cache: bool = True) -> list[torch.Tensor]:
    """requests: (typed prompt or None, input ids ending at the answer position, TaskEncoder). Returns, per
    request, the (n_labels,) log-likelihood of each label's words, as ``TaskEncoder.label_scores`` gives it for
    that request alone. Single-token verbalizers take one row; a multi-token one takes a row per word."""
    if backbone.kind != "causal_lm":
        return _score_per_prompt(backbone, requests)
    ids, mask = left_pad([list(r[1]) for r in requests], backbone.pad_token_id, backbone.device)
    model = MixedPromptedModel(backbone, [r[0] for r in requests], reuse_prompt_cache)
    return label_scores(model, ids, mask, [r[2].verbalizer for r in requests], normalize=True,
                        pad_id=backbone.pad_token_id)


def _score_per_prompt(backbone: Any, requests: list[tuple[Any, list[int], Any]]) -> list[torch.Tensor]:
    """A text encoder or an encoder-decoder: the rows of each (prompt, task) in one forward, scored as the task's
    encoder scores them (a task head, a masked-LM head at {mask}, label words through a decoder); a prompt is not a
    cached prefix of keys and values there."""
    from ..methods.base import Fixed
    from ..model import PromptedModel

    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prompt, _, enc) in enumerate(requests):
        groups.setdefault((id(prompt), id(enc)), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(requests)
    for rows in groups.values():
        prompt, _, enc = requests[rows[0]]
        ids, mask = left_pad([list(requests[i][1]) for i in rows], backbone.pad_token_id, backbone.device)
        model = PromptedModel(backbone, Fixed(prompt, backbone.hidden_size))
        scores = enc.label_scores(model, {"input_ids": ids, "attention_mask": mask}, normalize=True)
        for i, s in zip(rows, scores, strict=True):
            out[i] = s
    return out
