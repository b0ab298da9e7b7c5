"""Initialisers for a (P, H) prompt. Each returns a float32 tensor and is reproducible from its seed.

Lester et al. (2021), worst to best at small scale: random < sampled vocabulary < class labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import SoftPromptError

VOCAB_POOL = 5000  # Lester et al. sample from the 5,000 most common tokens


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def embed_scale(backbone: Any) -> float:
    """What the model's own embedding module multiplies a row of its matrix by (Gemma: sqrt(hidden); BART with
    scale_embedding: sqrt(d_model); most models: 1), read off one row: a prompt starts where real tokens are."""
    emb = backbone.embedding_matrix
    row = emb.shape[0] // 2
    raw = emb[row].detach().float()
    try:
        with torch.no_grad():
            seen = backbone.embed(torch.tensor([[row]], device=backbone.device))[0, 0].float()
    except SoftPromptError:
        return 1.0
    ratio = (seen.norm() / raw.norm().clamp(min=1e-12)).item()
    return 1.0 if abs(ratio - 1.0) < 1e-3 else ratio


def _emb(backbone: Any) -> torch.Tensor:
    """The input-embedding matrix as the model's embedding module hands its rows to the model."""
    emb = backbone.embedding_matrix
    if emb is None:
        raise SoftPromptError(f"backbone {backbone.name!r} has no vocabulary; use init='random'")
    scale = embed_scale(backbone)
    emb = emb.detach().float().cpu()
    return emb if scale == 1.0 else emb * scale


def random_init(backbone: Any, length: int, seed: int = 0) -> torch.Tensor:
    """Gaussian with the per-dimension mean and std of the input embeddings as the model sees them (unit normal
    without a vocabulary)."""
    g = _generator(seed)
    emb = backbone.embedding_matrix
    if emb is None:
        return torch.randn(length, backbone.hidden_size, generator=g)
    emb = _emb(backbone)
    mean, std = emb.mean(0), emb.std(0)
    return mean + std * torch.randn(length, emb.shape[1], generator=g)


def frequent_token_ids(backbone: Any) -> list[int]:
    """Ids of common, non-special word tokens: BPE/unigram vocabularies are ordered roughly by frequency,
    so the first VOCAB_POOL ids that decode to something with a letter in it, special tokens excluded."""
    tok = backbone.tokenizer
    V = backbone.embedding_matrix.shape[0]
    if tok is None:
        return list(range(min(V, VOCAB_POOL)))
    special = set(getattr(tok, "all_special_ids", []) or [])
    special |= set(getattr(tok, "added_tokens_decoder", {}) or {})
    ids = []
    for i in range(min(V, len(tok))):
        if i in special:
            continue
        s = tok.decode([i])
        if any(c.isalpha() for c in s) and "\ufffd" not in s and not (s.startswith("[") and s.endswith("]")):  # [unused3]
            ids.append(i)
            if len(ids) == VOCAB_POOL:
                break
    if not ids:
        raise SoftPromptError("the tokenizer has no word tokens to sample from; use init='random'")
    return ids


def vocab_init(backbone: Any, length: int, seed: int = 0) -> torch.Tensor:
    """Embeddings of tokens sampled (without replacement where possible) from the frequent-token pool."""
    pool = torch.tensor(frequent_token_ids(backbone))
    g = _generator(seed)
    if length <= len(pool):
        picked = pool[torch.randperm(len(pool), generator=g)[:length]]
    else:
        picked = pool[torch.randint(len(pool), (length,), generator=g)]
    return _emb(backbone)[picked].clone()


def _token_ids(backbone: Any, text: str) -> list[int]:
    if backbone.tokenizer is None:
        raise SoftPromptError(f"backbone {backbone.name!r} has no tokenizer; text and label initialisation need one")
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SoftPromptError(f"init text {text!r} tokenises to nothing; give some words")
    return ids


def text_init(backbone: Any, length: int, text: str, seed: int = 0) -> torch.Tensor:
    """The text's token embeddings, repeated or truncated to `length`."""
    ids = _token_ids(backbone, text)
    ids = (ids * (length // len(ids) + 1))[:length]
    return _emb(backbone)[torch.tensor(ids)].clone()


def labels_init(backbone: Any, length: int, labels: Sequence[str], seed: int = 0) -> torch.Tensor:
    """Each class label's embedding in one slot (multi-token labels averaged); the other slots sampled vocab."""
    if not labels:
        raise SoftPromptError("init='labels' needs the class label words (init_labels)")
    if len(labels) > length:
        raise SoftPromptError(f"{len(labels)} labels do not fit a prompt of {length} tokens; use a longer prompt")
    emb = _emb(backbone)
    out = vocab_init(backbone, length, seed)
    for i, label in enumerate(labels):
        out[i] = emb[torch.tensor(_token_ids(backbone, label))].mean(0)
    return out


def file_init(backbone: Any, length: int, path: str, seed: int = 0) -> torch.Tensor:
    """Transfer: the first rows of another prompt file (checked against this backbone); extra slots sampled vocab."""
    from .files import load_prompt

    src = load_prompt(path, backbone=backbone).tensors["prompt"].float()
    out = vocab_init(backbone, length, seed) if length > src.shape[0] else torch.empty(0, src.shape[1])
    n = min(length, src.shape[0])
    return torch.cat([src[:n], out[n:]]) if length > n else src[:n].clone()


INITIALISERS = {"random": random_init, "vocab": vocab_init, "text": text_init, "labels": labels_init, "file": file_init}


def initialise(backbone: Any, length: int, init: str = "vocab", *, text: str | None = None,
               labels: Sequence[str] | None = None, path: str | None = None, seed: int = 0) -> torch.Tensor:
    """Dispatch by name; returns a float32 (length, H) tensor on the CPU."""
    if init not in INITIALISERS:
        raise SoftPromptError(f"unknown init {init!r}; choose from {', '.join(INITIALISERS)}")
    if length < 1:
        raise SoftPromptError(f"a prompt needs at least 1 virtual token (got {length})")
    if init == "text":
        if not text:
            raise SoftPromptError("init='text' needs init_text")
        return text_init(backbone, length, text, seed)
    if init == "labels":
        return labels_init(backbone, length, labels or [], seed)
    if init == "file":
        if not path:
            raise SoftPromptError("init='file' needs init_file (a prompt file to start from)")
        return file_init(backbone, length, path, seed)
    return INITIALISERS[init](backbone, length, seed)
