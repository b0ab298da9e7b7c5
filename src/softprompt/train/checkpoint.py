"""Checkpoints: one safetensors file (tensors) with JSON metadata (everything else), written atomically.

Holds the method's tensors, the optimizer and scheduler state, the loop's counters, the best prompt so far and
the RNG state, so that a resumed run reaches the same final prompt bit for bit (on CPU). Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SoftPromptError
from ..files import atomic_write


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors inside nested dicts/lists by {"__tensor__": key}, collecting them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key, "scalar": obj.ndim == 0}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, "", {}) if not isinstance(k, (str, int)) else k,
                              _split(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(skeleton)}), overwrite=True)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise SoftPromptError(f"no checkpoint at {path}: nothing to resume; start without --resume")
    try:
        with safe_open(str(path), "pt") as f:
            skeleton = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SoftPromptError(f"checkpoint {path} is unreadable ({str(e).splitlines()[0][:100]}); "
                              "start again with --overwrite") from None
    return _join(skeleton, tensors)
