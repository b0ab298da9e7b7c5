"""Context prompts into CLIP's text encoder (CoOp, CoCoOp).

Each class becomes one text row, [SOS][placeholder x M][class name tokens][.][EOS]; a forward hook on the text
encoder's token embedding puts the context vectors over the placeholders (CLIP's text model takes no input
embeddings, and pools at the end-of-text token found from the ids, so the ids stay as they are). Like the ViT
hooks: installed once per backbone, inert outside a prompted forward (a context variable), removable.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch

from ..errors import SoftPromptError
from ..prompts import ContextPrompt
from ..runtime import runtime
from .base import register
from .vision import ImageJoin, check_images

_CTX: ContextVar[torch.Tensor | None] = ContextVar("softprompt_context", default=None)  # (N, M, H)


def _after_token_embedding(module, args, output):
    ctx = _CTX.get()
    if ctx is None:
        return None
    M = ctx.shape[1]
    return torch.cat([output[:, :1], ctx.to(output.dtype), output[:, 1 + M:]], dim=1)


def install_hooks(backbone: Any) -> None:
    rt = runtime(backbone)
    if "context" not in rt.extensions:
        rt.extensions["context"] = [backbone.token_embedding.register_forward_hook(_after_token_embedding)]


def uninstall_hooks(backbone: Any) -> None:
    for h in runtime(backbone).extensions.pop("context", []):
        h.remove()


def class_rows(backbone: Any, names: tuple[str, ...], M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, T) ids and mask of [SOS][placeholder x M][name][.][EOS] per class (cached per backbone)."""
    rt = runtime(backbone)
    cache = rt.extensions.setdefault("context_rows", {})
    key = (names, M)
    if key not in cache:
        tok = backbone.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        eos = tok.eos_token_id
        if eos is None:
            raise SoftPromptError(f"backbone {backbone.name!r}'s tokenizer has no end-of-text token")
        placeholder = bos  # any id below the end-of-text token's: its embedding is replaced
        rows = [[bos] + [placeholder] * M + tok(f"{n}.", add_special_tokens=False)["input_ids"] + [eos]
                for n in names]
        limit = backbone.max_positions
        if max(map(len, rows)) > limit:
            raise SoftPromptError(f"a class name with {M} context tokens exceeds CLIP's {limit} text positions; "
                                  "shorten the class names or the context")
        T = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        cache[key] = (ids.to(backbone.device), mask.to(backbone.device))
    return cache[key]


def text_features(backbone: Any, prompt: ContextPrompt, shift: torch.Tensor | None = None) -> torch.Tensor:
    """(K, D) normalised class features, or (B, K, D) with a per-image shift (B, H) of the context (CoCoOp)."""
    K, M = len(prompt.class_names), prompt.num_virtual_tokens
    ids, mask = class_rows(backbone, prompt.class_names, M)
    if prompt.ctx.ndim == 2:  # one context for all: the class names must read differently
        seen: dict[tuple, str] = {}
        for name, row in zip(prompt.class_names, ids.tolist(), strict=True):
            if tuple(row) in seen:
                raise SoftPromptError(f"class names {seen[tuple(row)]!r} and {name!r} give the same text to "
                                      f"{backbone.name!r}'s tokenizer, so one shared context cannot tell them apart; "
                                      "rename them, or use method.class_specific")
            seen[tuple(row)] = name
    ctx = prompt.ctx if prompt.ctx.ndim == 3 else prompt.ctx.unsqueeze(0).expand(K, -1, -1)  # (K, M, H)
    if shift is not None:
        B = shift.shape[0]
        ctx = (ctx.unsqueeze(0) + shift[:, None, None, :]).reshape(B * K, M, -1)
        ids, mask = ids.repeat(B, 1), mask.repeat(B, 1)
    install_hooks(backbone)
    reset = _CTX.set(ctx)
    try:
        feats = backbone.text_features(ids, mask)
    finally:
        _CTX.reset(reset)
    return feats if shift is None else feats.view(shift.shape[0], K, -1)


@register
class ContextIntoCLIP(ImageJoin):
    prompt_kind = "context"
    backbone_kind = "clip"

    def group(self, prompt: ContextPrompt) -> tuple:
        return (id(prompt),)  # each task's class texts are its own; images of one task share them

    def classify_rows(self, backbone, prompts: list[ContextPrompt], pixel_values):
        check_images(backbone, pixel_values)
        image = backbone.features(pixel_values)  # (B, D)
        scale = backbone.logit_scale
        out = []
        if len(prompts) == 1:  # one prompt for every row
            prompts = prompts * pixel_values.shape[0]
        for p in dict.fromkeys(prompts):  # rows here share one prompt (group); kept general
            rows = [i for i, q in enumerate(prompts) if q is p]
            f = image[rows]
            if p.meta is None:
                logits = scale * f @ text_features(backbone, p).T.to(f.dtype)
            else:
                w1, b1, w2, b2 = p.meta
                shift = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(f.to(w1.dtype), w1, b1)),
                                                   w2, b2)
                t = text_features(backbone, p, shift)  # (B, K, D)
                logits = scale * torch.einsum("bd,bkd->bk", f, t.to(f.dtype))
            out.append((rows, logits))
        if len(out) == 1 and len(out[0][0]) == len(prompts):
            return [out[0][1]]
        rows_out: list = [None] * len(prompts)
        for rows, logits in out:
            for j, i in enumerate(rows):
                rows_out[i] = logits[j:j + 1]
        return rows_out
