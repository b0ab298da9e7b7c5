"""The embedding prompt into an encoder-decoder (T5, BART): P virtual tokens in front of the encoder input, as
Lester et al. did; targets go through the decoder.

Rows are re-packed to right padding before the prompt goes in front ([prompt][row][pad...]): encoders with learned
absolute positions (BART) count positions from the first column, so every row's tokens sit at P.. whatever the
caller's padding side. A classification task scores its label words as decoder targets (each word's tokens after
the decoder start token, a label's words combined by logsumexp); a generation task's loss is the decoder's
cross-entropy on the target tokens; generation runs transformers' own ``generate`` on the prompted encoder input,
which encodes each row once and reuses the decoder's cache.

Batches arrive as the causal tasks make them (the input, then the target, labels -100 on the input): the join
splits each row into its encoder input and its decoder target.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SoftPromptError
from ..prompts import EmbeddingPrompt
from ..tasks.encode import Verbalizer
from .base import Join, register
from .causal import IGNORE_INDEX, check_mask


def right_padded(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real columns first (their order kept), padding after: x (B, T, ...) and mask (B, T)."""
    order = torch.sort((mask == 0).long(), dim=1, stable=True).indices
    index = order.view(*order.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index), mask.gather(1, order)


def _pad(rows: list[list[int]], value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([r + [value] * (T - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
    return ids, mask


@register
class EmbeddingsIntoSeq2Seq(Join):
    prompt_kind = "embeddings"
    backbone_kind = "seq2seq"

    def encoder_inputs(self, backbone: Any, prompt: EmbeddingPrompt | None, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([prompt][row][pad] embeddings, their mask), each row right-padded."""
        check_mask(attention_mask)
        embeds, mask = right_padded(backbone.embed(input_ids), attention_mask)
        P = 0 if prompt is None else prompt.num_virtual_tokens
        if P == 0:
            return embeds, mask
        B = embeds.shape[0]
        virtual = prompt.embeddings.to(device=embeds.device, dtype=embeds.dtype).unsqueeze(0).expand(B, -1, -1)
        ones = torch.ones(B, P, dtype=mask.dtype, device=mask.device)
        return torch.cat([virtual, embeds], 1), torch.cat([ones, mask], 1)

    def encoded(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds, mask = self.encoder_inputs(model.backbone, model.method(), input_ids, mask)
        return model.backbone.encode(embeds, mask), mask

    def forward(self, model, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                truncate=False, decoder_input_ids=None, **kwargs):
        """The model's outputs with the prompt in; `labels` are decoder targets (transformers' convention)."""
        if input_ids is None:
            raise SoftPromptError("a seq2seq prompt takes input_ids")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds, mask = self.encoder_inputs(model.backbone, model.method(), input_ids, mask)
        return model.backbone.model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                                    decoder_input_ids=decoder_input_ids, **kwargs)

    def hidden_states(self, model, input_ids, attention_mask=None, last_only: bool = False):
        """(B, 1, V): the decoder's logits at its first position (after the start token)."""
        if not last_only:
            raise SoftPromptError("a seq2seq model's targets go through its decoder: score them with label_scores "
                                  "or target_loss")
        bb = model.backbone
        states, mask = self.encoded(model, input_ids, attention_mask)
        start = torch.full((states.shape[0], 1), bb.decoder_start_token_id, device=states.device)
        return bb.decode(states, mask, start), None

    def label_scores(self, model, input_ids, attention_mask, verbalizers, normalize: bool = True, pad_id: int = 0):
        """Log-likelihood of each label's words as decoder targets; (B, n_labels) for one verbalizer, else a list.
        The encoder runs once per row; the decoder once per (row, word) (once per row for one-token words)."""
        bb = model.backbone
        shared = isinstance(verbalizers, Verbalizer)
        per_row = [verbalizers] * input_ids.shape[0] if shared else list(verbalizers)
        states, mask = self.encoded(model, input_ids, attention_mask)
        start = bb.decoder_start_token_id
        owners, words = [], []
        for b, v in enumerate(per_row):
            for c in v.candidates:
                owners.append(b)
                words.append(list(c))
        single = all(len(w) == 1 for w in words)
        if single:  # one decoder row per input row: the start token; every word read off its logits
            first = torch.full((states.shape[0], 1), start, device=states.device)
            logp = bb.decode(states, mask, first)[:, 0].float().log_softmax(-1)  # (B, V)
            word_logp = torch.stack([logp[b, w[0]] for b, w in zip(owners, words, strict=True)])
        else:
            dec, dmask = _pad([[start] + w[:-1] for w in words], bb.pad_token_id, states.device)
            idx = torch.tensor(owners, device=states.device)
            logp = bb.decode(states[idx], mask[idx], dec, dmask).float().log_softmax(-1)  # (R, K, V)
            target, _ = _pad(words, 0, states.device)
            got = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * dmask  # (R, K)
            word_logp = got.sum(1)
        out, r = [], 0
        for v in per_row:
            w = word_logp[r:r + len(v.candidates)]
            r += len(v.candidates)
            label_of = torch.tensor(v.candidate_label, device=w.device)
            out.append(torch.stack([w[label_of == k].logsumexp(0) for k in range(v.n_labels)]))
        return torch.stack(out) if shared else out

    def target_loss(self, model, input_ids, attention_mask, labels, reduction: str = "sum") -> torch.Tensor:
        """Cross-entropy of each row's target tokens (labels != -100) through the decoder, the row's other real
        tokens its encoder input."""
        bb = model.backbone
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        inputs, targets = [], []
        for ids, m, lab in zip(input_ids.tolist(), mask.tolist(), labels.tolist(), strict=True):
            inputs.append([t for t, a, y in zip(ids, m, lab, strict=True) if a and y == IGNORE_INDEX])
            targets.append([y for y in lab if y != IGNORE_INDEX])
        if not all(inputs) or not all(targets):
            raise SoftPromptError("every row needs input tokens and target tokens (labels -100 on the input)")
        enc_ids, enc_mask = _pad(inputs, bb.pad_token_id, input_ids.device)
        states, emask = self.encoded(model, enc_ids, enc_mask)
        dec, dmask = _pad([[bb.decoder_start_token_id] + t[:-1] for t in targets], bb.pad_token_id, states.device)
        gold, _ = _pad(targets, IGNORE_INDEX, states.device)
        logits = bb.decode(states, emask, dec, dmask).float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), gold, ignore_index=IGNORE_INDEX,
                                                 reduction=reduction)

    @torch.no_grad()
    def generate(self, backbone: Any, prompt: EmbeddingPrompt | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0) -> list[list[int]]:
        """New tokens per row (the start token, and EOS and what follows it, removed)."""
        embeds, mask = self.encoder_inputs(backbone, prompt, input_ids, attention_mask)
        sample = temperature > 0
        out = backbone.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=sample, temperature=temperature if sample else None,
                                      top_k=top_k if sample and top_k else None, top_p=top_p if sample else None,
                                      num_beams=1)
        eos = set(backbone.eos_token_ids)
        rows = []
        for seq in out[:, 1:].tolist():
            cut = next((i for i, t in enumerate(seq) if t in eos), len(seq))
            rows.append(seq[:cut])  # after EOS transformers pads finished rows
        return rows
