"""Classification scoring for a mixed-task batch: rows with different prompts and verbalizers in one forward."""

from __future__ import annotations

from typing import Any

import torch

from ..generation import forward_mixed
from ..tasks.encode import left_pad


@torch.no_grad()
def score_mixed(backbone: Any, requests: list[tuple[torch.Tensor | None, list[int], Any]]) -> list[torch.Tensor]:
    """requests: (prompt (P, H) or None, input ids ending at the answer position, TaskEncoder). Returns, per
    request, the (n_labels,) log-likelihood of each label's words, exactly as TaskEncoder.label_scores gives it
    for that request alone. Single-token verbalizers take one row; a multi-token one takes a row per word."""
    rows, prompts, owners = [], [], []  # owners: (request index, candidate index or -1 for "all, single-token")
    for r, (prompt, ids, enc) in enumerate(requests):
        if enc.single_token:
            rows.append(list(ids))
            prompts.append(prompt)
            owners.append((r, -1))
        else:
            for c, cand in enumerate(enc.candidates):
                rows.append(list(ids) + cand)
                prompts.append(prompt)
                owners.append((r, c))
    K = max((len(requests[r][2].candidates[c]) for r, c in owners if c >= 0), default=0)  # longest scored word
    input_ids, mask = left_pad(rows, backbone.pad_token_id, backbone.device)
    out, _, _ = forward_mixed(backbone, prompts, backbone.embed(input_ids), mask, logits_to_keep=K + 1)
    logp = out.logits.float().log_softmax(-1)  # (rows, K+1, V): rows end-aligned by left padding
    cand_scores: list[dict[int, torch.Tensor]] = [{} for _ in requests]
    for row, (r, c) in enumerate(owners):
        enc = requests[r][2]
        if c < 0:
            for j, cand in enumerate(enc.candidates):
                cand_scores[r][j] = logp[row, -1, cand[0]]
        else:
            cand = enc.candidates[c]
            pos = torch.arange(K - len(cand), K, device=logp.device)  # logits at these predict the word's tokens
            cand_scores[r][c] = logp[row, pos, torch.tensor(cand, device=logp.device)].sum()
    results = []
    for r, (_, _, enc) in enumerate(requests):
        scores = torch.stack([cand_scores[r][j] for j in range(len(enc.candidates))])
        label_of = torch.tensor(enc.candidate_label, device=scores.device)
        results.append(torch.stack([scores[label_of == k].logsumexp(0) for k in range(len(enc.task.labels))]))
    return results
