"""A Hugging Face text encoder (BERT family: ``BertModel``, ``RobertaModel``, MiniLM...) as a backbone.

Like every backbone it knows nothing about prompts. It embeds token ids, runs the encoder on embeddings with the
position ids and attention mask it is given (a prefix of keys/values through transformers' own ``Cache``), pools
final states into one feature per row ([CLS] or the mean of the real tokens), and, where the checkpoint has one,
runs its masked-LM head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from .base import Backbone

# model types whose position ids count from padding_idx + 1 (fairseq's convention), not from 0
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "data2vec-text")
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text",
                       "xlm-roberta-xl")
POOLINGS = ("cls", "mean")


class EncoderBackbone(Backbone):
    """A bidirectional text encoder. ``model`` is the checkpoint's model (with its masked-LM head when it has one);
    ``encoder`` the bare stack (final hidden states out)."""

    kind = "encoder"

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str | None = None, pooling: str = "cls"):
        super().__init__(model, name=name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
                         tokenizer=tokenizer)
        if pooling not in POOLINGS:
            raise SoftPromptError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        self.pooling = pooling  # the default a new task head pools with (the checkpoint's own, when it says)
        self.encoder = model.base_model
        self.mlm_head = _mlm_head(model)
        cfg = model.config
        self.position_offset = int(cfg.pad_token_id) + 1 if cfg.model_type in _OFFSET_POSITIONS else 0

    @property
    def config(self):
        return self.model.config

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.encoder.get_input_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        return int(self.model.config.max_position_embeddings) - self.position_offset

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return int(getattr(self.model.config, "pad_token_id", None) or 0)

    @property
    def mask_token_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.mask_token_id

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.get_input_embeddings()(input_ids)

    def kv_layout(self) -> tuple[int, int, int]:
        cfg = self.model.config
        heads = int(cfg.num_attention_heads)
        return int(cfg.num_hidden_layers), heads, int(cfg.hidden_size) // heads

    def new_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        from transformers import DynamicCache

        return DynamicCache(layers, config=self.model.config)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """(B, T, H) final hidden states of embeddings (B, T, H) at `position_ids` (counted from 0; the model's own
        offset is added here). `attention_mask` (B, P + T) covers the `prefix` keys/values (per layer, (B, heads,
        P, d)) and then the inputs."""
        B, T, _ = inputs_embeds.shape
        allowed = attention_mask.bool()[:, None, None, :].expand(B, 1, T, attention_mask.shape[1])
        bias = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        bias = bias.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)  # 4D: the model uses it as it is
        cache = None
        if prefix is not None:
            cache = self.new_cache(prefix)
        out = self.encoder(inputs_embeds=inputs_embeds, attention_mask=bias,
                           position_ids=position_ids + self.position_offset, cache=cache,
                           token_type_ids=torch.zeros(B, T, dtype=torch.long, device=inputs_embeds.device))
        if prefix is not None and cache.get_seq_length() != prefix[0][0].shape[2] + T:
            raise SoftPromptError(f"{self.name!r} ({self.config.model_type}) does not attend to cached keys/values; "
                                  "key/value prompts cannot go into it: use prompt_tuning")
        return out.last_hidden_state

    def pool(self, states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
        """(B, H) from final states (B, T, H) of the rows' own tokens (mask (B, T)): the first real token ([CLS])
        or the mean of the real tokens."""
        if pooling == "cls":
            first = mask.long().argmax(1)  # the first real column, whatever the padding side
            return states[torch.arange(states.shape[0], device=states.device), first]
        if pooling == "mean":
            w = mask.to(states.dtype).unsqueeze(-1)
            return (states * w).sum(1) / w.sum(1).clamp(min=1)
        raise SoftPromptError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled final states of the bare encoder (its own pooling): what a linear probe reads."""
        from ..joins.causal import input_positions

        states = self.forward(self.embed(input_ids), attention_mask, input_positions(attention_mask, 0))
        return self.pool(states, attention_mask, self.pooling)

    def mlm_logits(self, states: torch.Tensor) -> torch.Tensor:
        if self.mlm_head is None:
            raise SoftPromptError(f"{self.name!r} has no masked-LM head (its checkpoint is a bare encoder): a "
                                  "{mask} template cannot be scored on it; drop {mask} to train a classification "
                                  "head instead")
        return self.mlm_head(states)

    def prefix_states(self, embeds: torch.Tensor, head: bool = False):
        """Run (P, H) embeddings alone at positions 0..P-1 (batch 1): per-layer (keys, values), each
        (1, heads, P, head_dim); the start values of a key/value prompt."""
        P = embeds.shape[0]
        cache = self.new_cache()
        x = embeds.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        mask = torch.ones(1, P, dtype=torch.long, device=self.device)
        positions = torch.arange(P, device=self.device).unsqueeze(0)
        out = self.encoder(inputs_embeds=x, attention_mask=mask, position_ids=positions + self.position_offset,
                           cache=cache, token_type_ids=torch.zeros_like(mask))
        if cache.get_seq_length() != P:
            raise SoftPromptError(f"{self.name!r} ({self.config.model_type}) does not keep keys/values in a cache; "
                                  "key/value prompts cannot go into it: use prompt_tuning")
        return [(layer.keys, layer.values) for layer in cache.layers], out.last_hidden_state[:, -1]


def _mlm_head(model: nn.Module) -> nn.Module | None:
    """The masked-LM head of a ``*ForMaskedLM`` model: its one child besides the encoder (BERT's ``cls``,
    RoBERTa's ``lm_head``); None for a bare encoder."""
    base = getattr(model, "base_model_prefix", "")
    if model is model.base_model:
        return None
    others = [m for name, m in model.named_children() if name != base]
    return others[0] if len(others) == 1 else None


def default_pooling(source: Any) -> str:
    """A sentence-transformers folder says how it pools (1_Pooling/config.json): mean or [CLS]; else [CLS]."""
    cfg = Path(str(source)) / "1_Pooling" / "config.json"
    if cfg.exists():
        try:
            raw = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return "cls"
        if raw.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def load_encoder_backbone(source: Any, name: str, dtype: torch.dtype, device: torch.device) -> EncoderBackbone:
    """A text encoder with its tokenizer: with its masked-LM head when the checkpoint is a ``*ForMaskedLM`` /
    ``*ForPreTraining`` one, else the bare encoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from ..cache import quiet_progress_bars

    with quiet_progress_bars():
        cfg = AutoConfig.from_pretrained(source)
        heads = [a for a in (cfg.architectures or []) if a.endswith(("ForMaskedLM", "ForPreTraining"))]
        model = (AutoModelForMaskedLM if heads else AutoModel).from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    return EncoderBackbone(model.to(device), tokenizer, name=name, pooling=default_pooling(source))
