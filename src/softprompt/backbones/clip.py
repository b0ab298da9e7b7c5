"""CLIP (a transformers ``CLIPModel`` and its tokenizer): an image encoder and a text encoder whose normalised
features meet in one space, scaled by the model's logit scale. Context prompts (CoOp/CoCoOp) go into the text
encoder at its token embeddings; the backbone says where (``token_embedding``) and gives both features.

No CLIP ships offline: a user loads one from a local folder or a hub name; tests build tiny random ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Backbone

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPBackbone(Backbone):
    kind = "clip"

    def __init__(self, model: nn.Module, tokenizer: Any, name: str = "clip", preprocessing: dict | None = None):
        super().__init__(model, name=name, tokenizer=tokenizer)
        vis = model.config.vision_config
        pre = preprocessing or {}
        self.image_size = int(pre.get("image_size") or vis.image_size)
        self.channels = int(getattr(vis, "num_channels", 3))
        self.mean = tuple(float(m) for m in pre.get("mean", CLIP_MEAN))
        self.std = tuple(float(s) for s in pre.get("std", CLIP_STD))

    @property
    def hidden_size(self) -> int:
        """The text encoder's width: what a context token is."""
        return int(self.model.config.text_config.hidden_size)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.token_embedding.weight

    @property
    def feature_size(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def preprocessing(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised image features."""
        f = _features(self.model.get_image_features(pixel_values=pixel_values))
        return nn.functional.normalize(f, dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised text features (pooled at each row's end-of-text token)."""
        f = _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return nn.functional.normalize(f, dim=-1)


def load_clip_backbone(source: Any, name: str, dtype: torch.dtype, device: torch.device) -> CLIPBackbone:
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, CLIPModel

    from ..cache import quiet_progress_bars

    with quiet_progress_bars():
        model = CLIPModel.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    pre: dict = {}
    cfg_file = Path(str(source)) / "preprocessor_config.json"
    if cfg_file.exists():
        raw = json.loads(cfg_file.read_text())
        pre = {"mean": raw.get("image_mean", CLIP_MEAN), "std": raw.get("image_std", CLIP_STD)}
    return CLIPBackbone(model.to(device), tokenizer, name=name, preprocessing=pre)
