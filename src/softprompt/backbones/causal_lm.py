"""A Hugging Face causal LM as a backbone: runs on embeddings, takes transformers Cache objects."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Backbone


class CausalLMBackbone(Backbone):
    """A Hugging Face causal LM (any ``AutoModelForCausalLM``). Runs on embeddings, takes Cache objects."""

    kind = "causal_lm"

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str | None = None):
        super().__init__(model, name=name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
                         tokenizer=tokenizer)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # we pad ourselves; any id works under the mask
        self._kv_layout: tuple[int, int, int] | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return self.embedding_matrix.shape[1]

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config.get_text_config()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        cfg = self.model.config
        for key in ("pad_token_id", "eos_token_id"):
            v = getattr(cfg, key, None)
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None:
                return int(v)
        return 0

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            v = getattr(src, "eos_token_id", None) if src is not None else None
            ids += v if isinstance(v, list) else ([v] if v is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(int(i) for i in ids))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                **kwargs: Any) -> Any:
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=use_cache, **kwargs)

    def new_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """A transformers Cache object, optionally filled with per-layer (keys, values)."""
        from transformers import DynamicCache

        return DynamicCache(layers, config=self.model.config)

    @property
    def base(self) -> nn.Module:
        """The decoder stack without the LM head: final (normed) hidden states out."""
        return self.model.base_model

    def prefix_states(self, embeds: torch.Tensor, head: bool = False):
        """Run (P, H) embeddings alone at positions 0..P-1 (batch 1): per-layer (keys, values), each
        (1, kv_heads, P, head_dim), and the last position's final hidden state (1, H), or its logits (1, V) with
        `head`. Differentiable when `embeds` requires grad."""
        P = embeds.shape[0]
        dev = self.device
        body = self.model if head else self.base
        extra = {"logits_to_keep": 1} if head else {}
        out = body(inputs_embeds=embeds.to(device=dev, dtype=self.dtype).unsqueeze(0),
                   attention_mask=torch.ones(1, P, dtype=torch.long, device=dev),
                   position_ids=torch.arange(P, device=dev).unsqueeze(0), cache=self.new_cache(), use_cache=True,
                   **extra)
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        return layers, (out.logits[:, -1] if head else out.last_hidden_state[:, -1])

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim), read off one probe token's cache (so any attention variant's own
        shapes are what counts)."""
        if self._kv_layout is None:
            with torch.no_grad():
                layers, _ = self.prefix_states(torch.zeros(1, self.hidden_size, device=self.device))
            k = layers[0][0]
            self._kv_layout = (len(layers), k.shape[1], k.shape[3])
        return self._kv_layout
