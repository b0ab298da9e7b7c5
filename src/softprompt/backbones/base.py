"""The backbone protocol: a frozen model, where its embeddings enter, and what a prompt needs to know about it.

A backbone knows nothing about prompts. It embeds token ids, runs the model on embeddings, and describes itself
(kind, hidden size, vocabulary, position limit, attention layout, a fingerprint of its input-embedding matrix).
Methods make typed prompts; joins (``softprompt.joins``) put them where the backbone takes them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError

# Fingerprint probe: a fixed grid of entries of the input-embedding matrix. Comparing values with a relative
# tolerance of two bfloat16 roundings makes the same weights match whatever dtype they were loaded in, while
# another model (or the same architecture trained differently) does not.
_PROBE_ROWS, _PROBE_COLS = 16, 16
_PROBE_RTOL = 2.0**-7


class Backbone:
    """A frozen model that takes input embeddings. Subclasses say how to run it."""

    kind = "module"

    def __init__(self, model: nn.Module, name: str, tokenizer: Any = None):
        self.model = model
        self.name = name
        self.tokenizer = tokenizer
        freeze(model)
        self._fingerprint: dict | None = None

    # --- description -------------------------------------------------------------------------------
    @property
    def embedding_matrix(self) -> torch.Tensor | None:
        """(V, H) input-embedding weight, or None when the model has no token vocabulary."""
        return None

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def max_positions(self) -> int | None:
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> dict:
        """Shape and a fixed grid of values of the input-embedding matrix (dtype-tolerant, see matches())."""
        if self._fingerprint is None:
            emb = self.embedding_matrix
            if emb is None:
                self._fingerprint = {"shape": [self.hidden_size], "rows": [], "cols": [], "values": []}
            else:
                V, H = emb.shape
                rows = torch.linspace(0, V - 1, _PROBE_ROWS).round().long().unique().tolist()
                cols = torch.linspace(0, H - 1, _PROBE_COLS).round().long().unique().tolist()
                vals = emb.detach()[rows][:, cols].float().cpu()
                self._fingerprint = {"shape": [V, H], "rows": rows, "cols": cols,
                                     "values": [float(f"{v:.6g}") for v in vals.flatten().tolist()]}
        return self._fingerprint

    def fingerprint_id(self) -> str:
        return fingerprint_id(self.fingerprint())

    def kv_layout(self) -> tuple[int, int, int] | None:
        """(layers, key/value heads, head dim) of the attention a key/value prompt goes into; None: no attention."""
        return None

    # --- running -----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise SoftPromptError(f"backbone {self.name!r} has no token embedding; pass inputs_embeds instead of input_ids")

    def forward(self, inputs_embeds: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(inputs_embeds)


def fingerprint_id(fp: dict) -> str:
    """A short, human-readable id of a fingerprint (values rounded so dtype casts do not change it)."""
    coarse = {"shape": fp.get("shape"), "values": [round(v, 2) for v in fp.get("values", [])]}
    return hashlib.sha256(json.dumps(coarse, sort_keys=True).encode()).hexdigest()[:12]


def fingerprints_match(a: dict, b: dict) -> bool:
    if list(a.get("shape", [])) != list(b.get("shape", [])) or a.get("rows") != b.get("rows") or a.get("cols") != b.get("cols"):
        return False
    va, vb = torch.tensor(a.get("values", []), dtype=torch.float64), torch.tensor(b.get("values", []), dtype=torch.float64)
    return va.shape == vb.shape and bool(torch.all((va - vb).abs() <= _PROBE_RTOL * torch.maximum(va.abs(), vb.abs()) + 1e-7))


def freeze(model: nn.Module) -> None:
    """Every backbone weight stays as it was: no gradients, dropout off."""
    model.requires_grad_(False)
    model.eval()


class ModuleBackbone(Backbone):
    """Any PyTorch module that maps embeddings (B, T, H) to outputs (the plain ``nn.Linear`` case)."""

    def __init__(self, model: nn.Module, hidden_size: int, name: str = "module"):
        self._hidden = hidden_size
        super().__init__(model, name=name)

    @property
    def hidden_size(self) -> int:
        return self._hidden


