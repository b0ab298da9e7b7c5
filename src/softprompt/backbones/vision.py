"""Image backbones: a vision transformer (transformers' ViT family: ``ViTModel``, ``Dinov2Model``, ``DeiTModel``...)
and any plain image module (a CNN) that maps images to features.

Like every backbone they know nothing about prompts. A ViT says where tokens can go in (its embeddings module and
its list of layers, resolved from the model, not hard-coded: the paths changed between transformers 4 and 5) and
gives the final CLS state as features; an image module gives its output as features. Both carry the image
preprocessing their weights expect (size, mean, std), which a prompt file records.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from .base import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageBackbone(Backbone):
    """Any module that maps normalised images (B, C, S, S) to features (B, F): the pixel-prompt case (a CNN)."""

    kind = "image"

    def __init__(self, model: nn.Module, name: str = "image-module", image_size: int = 224, channels: int = 3,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(model, name=name)
        self.image_size, self.channels = int(image_size), int(channels)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        with torch.no_grad():  # the feature width, from one probe image
            probe = torch.zeros(1, self.channels, self.image_size, self.image_size, device=self.device,
                                dtype=self.dtype)
            self._features = int(self.features(probe).shape[-1])

    @property
    def hidden_size(self) -> int:
        return self._features

    @property
    def embedding_matrix(self) -> torch.Tensor | None:
        """The first weight of the module, flattened (out, in...) -> (in..., out): what the fingerprint reads."""
        for p in self.model.parameters():
            if p.ndim >= 2:
                return p.detach().flatten(1).T
        return None

    @property
    def preprocessing(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values)
        out = getattr(out, "pooler_output", None) if not isinstance(out, torch.Tensor) else out
        if out is None or out.ndim != 2:
            raise SoftPromptError(f"image module {self.name!r} must map images (B, C, S, S) to features (B, F)")
        return out


class ViTBackbone(Backbone):
    """A transformers vision transformer: patch embeddings + CLS, a list of layers, a final norm; features are the
    final CLS state (what ViT's and DINOv2's classifiers read)."""

    kind = "vit"

    def __init__(self, model: nn.Module, name: str, preprocessing: dict | None = None):
        super().__init__(model, name=name)
        cfg = model.config
        self.embeddings = _find_embeddings(model)
        self.layers = _find_layers(getattr(model, "vit", model), int(cfg.num_hidden_layers))
        self.patch_size = int(cfg.patch_size)
        self.channels = int(getattr(cfg, "num_channels", 3))
        pre = preprocessing or {}
        size = pre.get("image_size") or cfg.image_size
        self.image_size = int(min(size) if isinstance(size, (list, tuple)) else size)
        self.mean = tuple(float(m) for m in pre.get("mean", IMAGENET_MEAN))
        self.std = tuple(float(s) for s in pre.get("std", IMAGENET_STD))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The patch projection (H, C, p, p) as (C*p*p, H): the fingerprint reads weights, not only the width, so
        another ViT of the same shape does not match."""
        proj = self.embeddings.patch_embeddings.projection.weight
        return proj.detach().flatten(1).T

    @property
    def preprocessing(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, H): the final (normalised) CLS state."""
        out = self.model(pixel_values=pixel_values)
        return out.last_hidden_state[:, 0]


def _find_embeddings(model: nn.Module) -> nn.Module:
    for path in ("embeddings", "vision_model.embeddings", "vit.embeddings"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if mod is not None and hasattr(mod, "patch_embeddings"):
            return mod
    raise SoftPromptError(f"{type(model).__name__} has no patch embeddings module; a ViT-family model is needed")


def _find_layers(model: nn.Module, n: int) -> nn.ModuleList:
    """The encoder's list of n layers, wherever this transformers version keeps it."""
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise SoftPromptError(f"could not find the {n} encoder layers of {type(model).__name__}")


class DetectorBackbone(ViTBackbone):
    """A ViT detector (transformers' ``YolosForObjectDetection``): [CLS][patches][detection tokens] through the ViT,
    then per detection token a class head and a box head (normalised centre x, centre y, width, height). A task's
    classes get their own class head (with a "no object" class: ``head_extra_classes``); the box head is the
    model's own, frozen."""

    kind = "detector"
    head_extra_classes = 1  # "no object"

    def __init__(self, model: nn.Module, name: str, preprocessing: dict | None = None):
        super().__init__(model, name, preprocessing)
        self.num_detection_tokens = int(model.config.num_detection_tokens)

    def detection_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, H): the final states of the N detection tokens."""
        return self.model.vit(pixel_values).last_hidden_state[:, -self.num_detection_tokens:]

    def boxes(self, states: torch.Tensor) -> torch.Tensor:
        return self.model.bbox_predictor(states).sigmoid()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vit(pixel_values).last_hidden_state[:, 0]


VISION_MODEL_TYPES = ("vit", "dinov2", "deit", "dinov2_with_registers", "vit_msn", "beit", "efficientnet_lite", "yolos")


def load_vision_backbone(source: Any, name: str, dtype: torch.dtype, device: torch.device) -> Backbone:
    """A ViT-family model (``AutoModel``), or the built-in EfficientNet-Lite0, with its preprocessing
    (preprocessor_config.json when present)."""
    import json
    from pathlib import Path

    from transformers import AutoModel

    from ..cache import quiet_progress_bars

    folder = Path(str(source))
    if (folder / "config.json").exists() and \
            json.loads((folder / "config.json").read_text()).get("model_type") == "efficientnet_lite":
        from safetensors.torch import load_file

        from .efficientnet import MEAN, STD, EfficientNetLite0, Features

        net = EfficientNetLite0()
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return ImageBackbone(Features(net).to(device=device, dtype=dtype), name=name, image_size=224, mean=MEAN,
                             std=STD)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type") \
        if (folder / "config.json").exists() else None
    with quiet_progress_bars():
        if model_type == "yolos":
            from transformers import YolosForObjectDetection

            model = YolosForObjectDetection.from_pretrained(source, dtype=dtype)
        else:
            model = AutoModel.from_pretrained(source, dtype=dtype)
    pre: dict = {}
    cfg_file = Path(str(source)) / "preprocessor_config.json"
    if cfg_file.exists():
        raw = json.loads(cfg_file.read_text())
        size = raw.get("crop_size") or raw.get("size") or {}
        size = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        pre = {"image_size": size, "mean": raw.get("image_mean", IMAGENET_MEAN),
               "std": raw.get("image_std", IMAGENET_STD)}
    cls = DetectorBackbone if model_type == "yolos" else ViTBackbone
    return cls(model.to(device), name=name, preprocessing=pre)
