"""Prompt ensembles (Lester et al. 2021, section 7): several prompts trained for one task, each row scored under
every one of them, the members' label probabilities combined by their mean (``mean``) or by majority vote
(``vote``, ties broken by the mean).

On a causal LM the members run in one forward: the batch repeated once per member, each copy under its own prompt
(the mixed-task machinery serving uses, each prompt's prefix cached). Other backbones score member by member.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import SoftPromptError
from .evaluate import classification_metrics
from .model import MixedPromptedModel, PromptedModel
from .precision import autocast

COMBINE = ("mean", "vote")


class Ensemble:
    """Members (methods, each inference-ready) of one task on one backbone. ``label_scores`` and
    ``classify_tokens`` make it a model view the task encoders score through: the combined (B, K) scores."""

    def __init__(self, backbone: Any, members: list, combine: str = "mean"):
        if len(members) < 2:
            raise SoftPromptError("an ensemble needs at least two prompts")
        if combine not in COMBINE:
            raise SoftPromptError(f"unknown ensemble combination {combine!r}; use one of {', '.join(COMBINE)}")
        self.backbone, self.members, self.combine = backbone, list(members), combine
        from .joins import get_join

        # one forward for every member where the join keeps prompts as cached prefixes (causal LMs)
        self.mixed = all(hasattr(get_join(m.prompt_kind, backbone.kind), "prefix") for m in self.members) and \
            not any(getattr(m(), "head", None) is not None for m in self.members)

    def member_scores(self, enc: Any, batch: dict) -> torch.Tensor:
        """(N, B, K) each member's log-probabilities over the task's labels for the batch's rows."""
        N, B = len(self.members), batch["y"].shape[0]
        if self.mixed:
            prompts = [m() for m in self.members for _ in range(B)]
            view = MixedPromptedModel(self.backbone, prompts)
            rep = {k: v.repeat(N, *([1] * (v.ndim - 1))) for k, v in batch.items()}
            scores = enc.label_scores(view, rep, normalize=True).view(N, B, -1)
        else:
            scores = torch.stack([enc.label_scores(PromptedModel(self.backbone, m), batch, normalize=True)
                                  for m in self.members])
        return scores.float().log_softmax(-1)  # over the labels: members on one scale

    def combined(self, member_logp: torch.Tensor) -> torch.Tensor:
        return combine(member_logp, self.combine)


def combine(member_logp: torch.Tensor, how: str) -> torch.Tensor:
    """(N, ..., K) members' log-probabilities over the labels -> (..., K): the mean probability (as a log), or for
    ``vote`` the vote counts with the mean as a tie-breaker. The argmax is the ensemble's answer."""
    mean = member_logp.exp().mean(0).log()
    if how == "mean":
        return mean
    votes = torch.nn.functional.one_hot(member_logp.argmax(-1), member_logp.shape[-1]).sum(0).float()
    return votes + mean.exp() * 1e-3


def evaluate_ensemble(ens: Ensemble, enc: Any, rows: list[dict], batch_size: int = 16,
                      precision: str = "float32") -> dict:
    """Metrics of the ensemble and of each member alone, from one pass over the rows."""
    device = ens.backbone.device
    N = len(ens.members)
    gold = [enc.label_index(r) for r in rows]
    preds = [[0] * len(rows) for _ in range(N + 1)]  # members, then the ensemble
    nll = [0.0] * (N + 1)
    with torch.no_grad():
        for idx, batch in enc.eval_batches(rows, batch_size, device):
            with autocast(precision, device):
                logp = ens.member_scores(enc, batch)  # (N, B, K)
            mean = logp.exp().mean(0).log()
            for j, scores in enumerate([*logp, ens.combined(logp)]):
                for i, p in zip(idx, scores.argmax(-1).tolist(), strict=True):
                    preds[j][i] = p
                lp = logp[j] if j < N else mean
                nll[j] += float(torch.nn.functional.nll_loss(lp, batch["y"], reduction="sum"))
    out = []
    for j in range(N + 1):
        m = classification_metrics(preds[j], gold, enc.task.labels)
        m["loss"] = nll[j] / max(1, len(rows))
        out.append(m)
    return {**out[-1], "combine": ens.combine, "members": out[:-1]}
