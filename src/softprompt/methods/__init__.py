"""Methods: what trains. Each method is one file and one line in METHODS, under its name, which is also its CLI
value and the ``method`` field of a saved prompt file. A method returns a typed prompt (``softprompt.prompts``);
a join (``softprompt.joins``) puts it into the backbone."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SoftPromptError
from .base import Method, MethodConfig
from .coop import CoCoOp, CoCoOpConfig, CoOp, CoOpConfig
from .head import HEAD_TENSORS, Headed
from .p_tuning import PTuning, PTuningConfig
from .pixel import PixelPromptConfig, PixelPrompting
from .prefix_tuning import DeepPrompt, PrefixTuning, PrefixTuningConfig
from .prompt_tuning import PromptTuning, PromptTuningConfig
from .residual import ResidualConfig, ResidualPromptTuning
from .vpt import VPT, VPTConfig

METHODS: dict[str, type[Method]] = {m.name: m for m in (PromptTuning, ResidualPromptTuning, PTuning, PrefixTuning,
                                                         DeepPrompt, VPT, PixelPrompting, CoOp, CoCoOp)}

__all__ = ["METHODS", "CoCoOp", "CoCoOpConfig", "CoOp", "CoOpConfig", "DeepPrompt", "Headed", "Method", "MethodConfig", "PTuning", "PTuningConfig", "PrefixTuning",
           "PixelPromptConfig", "PixelPrompting", "PrefixTuningConfig", "PromptTuning", "PromptTuningConfig",
           "ResidualConfig", "ResidualPromptTuning", "VPT", "VPTConfig",
           "from_file", "get_method", "load_method"]


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise SoftPromptError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def from_file(pf: Any, device: Any = None) -> Method:
    """The method a prompt file holds (a PromptFile from ``load_prompt``), inference-ready (eval mode: no dropout)."""
    cls = get_method(pf.method)
    try:  # a file's tensors and config come from anywhere: what does not fit is a one-line refusal
        if HEAD_TENSORS[0] in pf.tensors and not cls.owns_head:  # a text method with a task head (encoders)
            module = Headed.from_tensors_of(cls, pf.tensors, pf.metadata.get("method_config"),
                                            str(pf.metadata.get("pooling", "cls"))).eval()
        else:
            module = cls.from_tensors(pf.tensors, pf.metadata.get("method_config")).eval()
        module = module.to(device) if device is not None else module
        with torch.no_grad():
            module()  # the prompt it makes: shapes that do not fit fail here, not in a request
    except SoftPromptError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as e:
        where = getattr(pf, "path", None) or "the prompt file"
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise SoftPromptError(f"{where}: its tensors and config do not make a {pf.method} prompt ({first}); the "
                              "file is damaged or was written by another tool") from None
    return module


def load_method(path: Any, backbone: Any = None, check_backbone: bool = True) -> Method:
    """Read a prompt file (checked against `backbone` when given) and rebuild its method on the backbone's
    device: ``load_method("task.safetensors", bb)``."""
    from ..files import load_prompt

    pf = load_prompt(path, backbone=backbone, check_backbone=check_backbone)
    return from_file(pf, None if backbone is None else backbone.device)
