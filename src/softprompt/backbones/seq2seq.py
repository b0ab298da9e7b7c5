"""A Hugging Face encoder-decoder (T5, BART, ...: any ``AutoModelForSeq2SeqLM``) as a backbone.

Like every backbone it knows nothing about prompts. It embeds token ids with the encoder's own embedding module
(BART's scales by sqrt(d_model) inside it), encodes embeddings, and runs the decoder over encoder states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Backbone

SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "longt5", "switch_transformers")


class Seq2SeqBackbone(Backbone):
    kind = "seq2seq"

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str | None = None):
        super().__init__(model, name=name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
                         tokenizer=tokenizer)

    @property
    def config(self):
        return self.model.config

    @property
    def encoder(self) -> nn.Module:
        return self.model.get_encoder()

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.encoder.get_input_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "d_model", None) or self.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        """The encoder's position limit (learned positions: BART); None for relative positions (T5)."""
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if n and self.config.model_type not in ("t5", "mt5", "umt5", "longt5") else None

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return int(getattr(self.config, "pad_token_id", None) or 0)

    @property
    def decoder_start_token_id(self) -> int:
        start = getattr(self.model.generation_config, "decoder_start_token_id", None)
        start = start if start is not None else self.config.decoder_start_token_id
        return int(start if start is not None else self.pad_token_id)

    @property
    def eos_token_ids(self) -> list[int]:
        v = self.config.eos_token_id
        return [int(i) for i in (v if isinstance(v, list) else [v]) if i is not None]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.get_input_embeddings()(input_ids)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) final encoder states."""
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    def decode(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
               decoder_input_ids: torch.Tensor, decoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, V) decoder logits for decoder input ids (B, D) over encoder states."""
        from transformers.modeling_outputs import BaseModelOutput

        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                          attention_mask=encoder_mask, decoder_input_ids=decoder_input_ids,
                          decoder_attention_mask=decoder_mask).logits


def load_seq2seq_backbone(source: Any, name: str, dtype: torch.dtype, device: torch.device) -> Seq2SeqBackbone:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ..cache import quiet_progress_bars

    with quiet_progress_bars():
        model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            tokenizer = None
    return Seq2SeqBackbone(model.to(device), tokenizer, name=name)
