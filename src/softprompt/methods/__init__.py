"""Methods: what trains. Each method is a small module registered here by its file name, which is also its
CLI value and the ``method`` field of a saved prompt file."""

from __future__ import annotations

from .prompt_tuning import PromptTuning, PromptTuningConfig

METHODS = {PromptTuning.name: PromptTuning}

__all__ = ["METHODS", "PromptTuning", "PromptTuningConfig", "get_method"]


def get_method(name: str):
    from ..errors import SoftPromptError

    if name not in METHODS:
        raise SoftPromptError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]
