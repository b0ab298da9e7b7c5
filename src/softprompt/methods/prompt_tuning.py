"""Prompt tuning (Lester et al. 2021): a (P, H) matrix of virtual-token embeddings, the only thing that trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import SoftPromptError
from ..init import initialise


@dataclass
class PromptTuningConfig:
    """How a prompt-tuning prompt is shaped and initialised."""

    num_virtual_tokens: int = 20  # Lester et al.: 20 gets most of the gain, >100 is mildly worse
    init: str = "vocab"  # random | vocab | text | labels | file
    init_text: str | None = None  # for init="text"
    init_labels: list[str] = field(default_factory=list)  # for init="labels": the verbalizer words
    init_file: str | None = None  # for init="file": transfer from another prompt
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.num_virtual_tokens) < 0:  # 0 is allowed: the bare model, a useful baseline
            raise SoftPromptError(f"num_virtual_tokens must be >= 0 (got {self.num_virtual_tokens})")


class PromptTuning(nn.Module):
    """Holds the prompt as a float32 parameter whatever the backbone dtype; joins cast it."""

    name: ClassVar[str] = "prompt_tuning"

    def __init__(self, weight: torch.Tensor, config: PromptTuningConfig | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise SoftPromptError(f"a prompt is a (P, H) matrix; got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())  # (P, H)
        self.config = config or PromptTuningConfig(num_virtual_tokens=weight.shape[0])

    @classmethod
    def create(cls, backbone: Any, config: PromptTuningConfig | None = None, **kwargs: Any) -> PromptTuning:
        """A new prompt for `backbone`, e.g. ``PromptTuning.create(bb, num_virtual_tokens=20, init="text", init_text=...)``."""
        config = config or PromptTuningConfig(**kwargs)
        weight = initialise(backbone, config.num_virtual_tokens, config.init, text=config.init_text,
                            labels=config.init_labels, path=config.init_file, seed=config.seed)
        return cls(weight, config).to(backbone.device)

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> torch.Tensor:
        return self.weight  # (P, H)

    # what a prompt file holds for this method
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.weight.detach()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved values in place (resume, keep-best), keeping the parameter object the optimizer holds."""
        self.weight.copy_(tensors["prompt"])

    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> PromptTuning:
        if "prompt" not in tensors:
            raise SoftPromptError(f"prompt file has no 'prompt' tensor (found: {', '.join(tensors) or 'none'})")
        known = PromptTuningConfig.__dataclass_fields__
        cfg = PromptTuningConfig(**{k: v for k, v in (config or {}).items() if k in known})
        cfg.num_virtual_tokens = tensors["prompt"].shape[0]
        return cls(tensors["prompt"], cfg)
