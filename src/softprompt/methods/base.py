"""What every method shares: a config dataclass, a constructor from a backbone, a typed prompt out, and the tensors
a prompt file and a checkpoint hold.

A method is an ``nn.Module`` whose parameters are everything that trains. ``forward()`` returns a typed prompt
(``softprompt.prompts``). Two sets of tensors leave it:

- ``tensors()``: the prompt as inference needs it, collapsed (a reparameterisation's MLP or encoder applied and
  dropped). This is what a prompt file holds: a few kilobytes, what serving loads.
- ``state_tensors()``: every trainable tensor (the reparameterisation included), what a training checkpoint holds,
  so that ``--resume`` continues exactly. For methods without a reparameterisation the two are the same.

``from_tensors`` rebuilds a method from either: from a prompt file it is inference-ready (and trains further as the
collapsed prompt); from a checkpoint's state it is the whole method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import SoftPromptError
from ..prompts import Prompt


@dataclass
class MethodConfig:
    """How a prompt is shaped and initialised (the fields every method has)."""

    num_virtual_tokens: int = 20  # Lester et al.: 20 gets most of the gain, >100 is mildly worse
    init: str = "vocab"  # random | vocab | text | labels | file
    init_text: str | None = None  # for init="text"
    init_labels: list[str] = field(default_factory=list)  # for init="labels": the verbalizer words
    init_file: str | None = None  # for init="file": transfer from another prompt
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.num_virtual_tokens) < 0:  # 0 is allowed: the bare model, a useful baseline
            raise SoftPromptError(f"num_virtual_tokens must be >= 0 (got {self.num_virtual_tokens})")

    @classmethod
    def from_dict(cls, values: dict | None) -> MethodConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})


class Method(nn.Module):
    """Base of every method. Subclasses set ``name`` (registry, CLI and file name), ``prompt_kind`` and ``Config``."""

    name: ClassVar[str]
    prompt_kind: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    owns_head: ClassVar[bool] = False  # its own tensors hold its task head (image methods); else ``Headed`` adds one

    def __init__(self, config: MethodConfig):
        super().__init__()
        self.config = config

    # --- construction --------------------------------------------------------------------------------------
    @classmethod
    def create(cls, backbone: Any, config: MethodConfig | None = None, **kwargs: Any) -> Method:
        """A new, initialised method for `backbone`, e.g. ``PromptTuning.create(bb, num_virtual_tokens=20)``."""
        config = config or cls.Config(**kwargs)
        return cls.build(backbone, config).to(backbone.device)

    @classmethod
    def build(cls, backbone: Any, config: MethodConfig) -> Method:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Method:
        """From a prompt file's tensors (inference-ready) or a checkpoint's state tensors (everything)."""
        raise NotImplementedError

    # --- what it is -----------------------------------------------------------------------------------------
    def forward(self) -> Prompt:
        raise NotImplementedError

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @property
    def hidden_size(self) -> int:
        """The backbone width this prompt is for."""
        raise NotImplementedError

    def check_backbone(self, backbone: Any) -> None:
        """One line naming both sides when this prompt cannot go into `backbone`."""
        if self.hidden_size != backbone.hidden_size:
            raise SoftPromptError(
                f"{self.name} prompt of width {self.hidden_size} does not fit backbone {backbone.name!r} of hidden "
                f"size {backbone.hidden_size}; create the prompt for this backbone")

    def describe(self) -> dict:
        """Shape facts recorded in a prompt file's metadata (checked when it is loaded for a backbone)."""
        return {"num_virtual_tokens": self.num_virtual_tokens, "hidden_size": self.hidden_size}

    def config_dict(self) -> dict:
        return asdict(self.config)

    # --- tensors in and out -----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The collapsed prompt, what a prompt file holds."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that trains, what a checkpoint holds (default: the parameters by name)."""
        return {k: v.detach() for k, v in self.named_parameters()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved values in place (resume, keep-best), keeping the parameter objects the optimizer holds."""
        params = dict(self.named_parameters())
        if set(params) != set(tensors):
            raise SoftPromptError(f"a {self.name} state needs tensors {sorted(params)}, got {sorted(tensors)}; "
                                  "resume with the method the run was started with")
        for k, p in params.items():
            p.copy_(tensors[k])


def require(tensors: dict[str, torch.Tensor], name: str, method: str) -> torch.Tensor:
    if name not in tensors:
        raise SoftPromptError(f"a {method} prompt needs a {name!r} tensor (found: {', '.join(tensors) or 'none'}); "
                              "is this file for another method?")
    return tensors[name]


class Fixed(Method):
    """A typed prompt as a method that does not train: the view serving scores a loaded prompt through (None: no
    prompt, the bare model)."""

    name = "fixed"

    def __init__(self, prompt: Prompt | None, hidden_size: int):
        from ..prompts import EmbeddingPrompt

        prompt = prompt if prompt is not None else EmbeddingPrompt(torch.empty(0, hidden_size))
        super().__init__(MethodConfig(num_virtual_tokens=prompt.num_virtual_tokens))
        self.prompt, self.prompt_kind, self._hidden = prompt, prompt.kind, hidden_size

    @property
    def hidden_size(self) -> int:
        return self._hidden

    def forward(self) -> Prompt:
        return self.prompt
