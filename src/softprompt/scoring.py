"""The one scorer: label log-likelihoods of verbalizer words, and the target loss. Training, evaluation, compare
and serving all score through here, on any model view that offers ``hidden_states`` and ``head``
(``PromptedModel``: one prompt, with gradient; ``MixedPromptedModel``: a prompt per row).

The LM head runs only where a score needs it: at the answer position, and there over the label words' rows only
when the scores need not be normalised.
"""

from __future__ import annotations

import torch
from torch import nn

from .tasks.encode import Verbalizer, left_pad


def label_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 verbalizers: Verbalizer | list[Verbalizer], normalize: bool = True,
                 pad_id: int = 0) -> list[torch.Tensor] | torch.Tensor:
    """Log-likelihood of each label's words at the answer position (the last column of left-padded rows), a
    label's words combined by logsumexp. One verbalizer for all rows: a (B, n_labels) tensor; one per row: a list.

    normalize=False (single-token words): the softmax normaliser, the same for every label of a row, is left out,
    and only the words' rows of the LM head are computed: the argmax and a cross-entropy over the labels are
    unchanged. Multi-token words: each row is scored once per word, the word appended. A join that scores
    otherwise (an encoder-decoder: the words as decoder targets) does it through its own ``label_scores``."""
    own = getattr(getattr(model, "join", None), "label_scores", None)
    if own is not None:
        return own(model, input_ids, attention_mask, verbalizers, normalize, pad_id)
    shared = isinstance(verbalizers, Verbalizer)
    B = input_ids.shape[0]
    per_row = [verbalizers] * B if shared else list(verbalizers)
    words: list[torch.Tensor] = []
    if all(v.single_token for v in per_row):
        firsts = sorted({c[0] for v in per_row for c in v.candidates})
        states, _ = model.hidden_states(input_ids, attention_mask, last_only=True)
        h = states[:, -1]  # (B, .) at the answer position
        if normalize:
            logp = model.head(h).float().log_softmax(-1)[:, firsts]  # (B, W)
        else:
            logp = model.head(h, firsts).float()  # (B, W): W rows of the LM head, not V
        col = {t: j for j, t in enumerate(firsts)}
        if shared:  # one gather and one logsumexp for the batch: a label's words by a (words, labels) mask
            v = verbalizers
            w = logp[:, [col[c[0]] for c in v.candidates]]  # (B, C)
            owner = torch.tensor(v.candidate_label, device=w.device)
            mine = owner[:, None] == torch.arange(v.n_labels, device=w.device)  # (C, n_labels)
            return (w[:, :, None] + torch.zeros_like(mine, dtype=w.dtype).masked_fill(~mine, -torch.inf)).logsumexp(1)
        for b, v in enumerate(per_row):
            words.append(logp[b, [col[c[0]] for c in v.candidates]])
    else:  # a row per (row, word): the word's tokens appended, each predicted by the position before it
        rows, owners = [], []
        for b, v in enumerate(per_row):
            real = input_ids[b][attention_mask[b].bool()].tolist()
            for c in v.candidates:
                rows.append(real + list(c))
                owners.append(b)
        xi, xm = left_pad(rows, pad_id, input_ids.device)
        K = max(len(c) for v in per_row for c in v.candidates)
        view = model.take(torch.tensor(owners))
        states, _ = view.hidden_states(xi, xm)
        logp = view.head(states[:, -K - 1:-1]).float().log_softmax(-1)  # (R, K, V): position t predicts t + 1
        scores = []
        r = 0
        for v in per_row:
            got = []
            for c in v.candidates:
                pos = torch.arange(K - len(c), K, device=logp.device)
                got.append(logp[r, pos, torch.tensor(c, device=logp.device)].sum())
                r += 1
            scores.append(torch.stack(got))
        words = scores
    out = []
    for v, w in zip(per_row, words, strict=True):
        label_of = torch.tensor(v.candidate_label, device=w.device)
        out.append(torch.stack([w[label_of == k].logsumexp(0) for k in range(v.n_labels)]))
    return torch.stack(out) if shared else out


def target_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                reduction: str = "sum") -> torch.Tensor:
    """Causal LM cross-entropy of labels (B, T) (-100: no loss), the logits computed at the target positions only,
    never at every position. Equal to forward(..., labels=labels).loss with reduction="mean". An encoder-decoder's
    join splits each row into its encoder input and decoder target (its own ``target_loss``)."""
    own = getattr(getattr(model, "join", None), "target_loss", None)
    if own is not None:
        return own(model, input_ids, attention_mask, labels, reduction)
    states, last = model.hidden_states(input_ids, attention_mask)  # (B, T, .)
    B = states.shape[0]
    # the state at position t predicts the token at t + 1; the last prompt position predicts token 0
    first = states.new_zeros(B, 1, states.shape[-1]) if last is None else \
        last.to(states.dtype).expand(B, -1).unsqueeze(1)
    pred = torch.cat([first, states[:, :-1]], dim=1)
    where = labels != -100  # (B, T)
    if last is None:
        where[:, 0] = False  # nothing predicts the first token
    logits = model.head(pred[where]).float()  # (N, V), N target tokens
    return nn.functional.cross_entropy(logits, labels[where], reduction=reduction)
