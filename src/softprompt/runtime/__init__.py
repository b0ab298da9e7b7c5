"""The runtime of a backbone: what softprompt keeps per loaded model, shared by training, evaluation, generation
and serving: one prompt cache and one fast path.

``runtime(backbone)`` returns the backbone's runtime, creating it (and installing the fast path) on first use. It
lives beside the backbone, not on it: a registry keyed by the backbone object, dropped with it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from ..fastpath import FastPath, FastPathConfig
from ..prompts import Prompt, content_hash
from .prompt_cache import PromptCache


class Runtime:
    def __init__(self, backbone: Any, config: FastPathConfig | None = None):
        self.backbone = backbone
        self.cache = PromptCache()
        self.extensions: dict[str, Any] = {}  # what a join installs on this backbone once (e.g. hooks), by name
        self.fastpath: FastPath | None = None
        if backbone.kind == "causal_lm":
            self.fastpath = FastPath(backbone, config)
            self.fastpath.install()
            self.fastpath.say_notice()

    @property
    def lean(self) -> bool:
        """Whether final hidden states + head() stand in for the model's logits (else: logits, head() selects)."""
        return self.fastpath is not None and self.fastpath.lean

    def head(self, states: torch.Tensor, rows=None) -> torch.Tensor:
        """Logits from what the rows' forward returned: the LM head on hidden states (lean), or the logits
        themselves, `rows` selected (plain)."""
        if self.lean:
            return self.fastpath.head(states, rows)
        return states if rows is None else states[..., torch.as_tensor(rows, device=states.device)]

    def engaged(self, mask: torch.Tensor | None = None, last_only: bool = False):
        import contextlib

        return self.fastpath.engaged(mask, last_only) if self.fastpath is not None else contextlib.nullcontext()

    def decode_step(self):
        """The fast path's lean decode step (see FastPath.decode_step), or None: run the model's forward."""
        return self.fastpath.decode_step() if self.fastpath is not None else None

    def joint_forward(self):
        """The fast path's lean forward of a decode step and/or a new batch's prefill (FastPath.joint_forward), or
        None: run the model's forward."""
        return self.fastpath.joint_forward() if self.fastpath is not None else None

    def configure(self, config: FastPathConfig) -> None:
        """Switch speed-ups on or off (public: benchmarks and tests compare paths through this)."""
        fp = self.fastpath
        if fp is None:
            return
        lean = self.lean
        if fp.installed and config.enabled:
            fp.config = config  # the switches are read at every forward
        else:
            fp.uninstall()
            fp.config, fp.notice = config, None
            fp.install()
        if self.lean != lean:
            self.cache.clear()  # prefixes computed under the other head mode

    def cache_key(self, prompt: Prompt | None, extra: tuple = ()) -> tuple:
        bb = self.backbone
        dev = bb.device
        auto = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        digest = content_hash(prompt) if prompt is not None else "none"
        return (digest, bb.dtype, str(dev), auto, self.lean, extra)

    def clear(self) -> None:
        """Drop what was computed from the weights and kept (prompt prefixes, weight casts); later calls recompute."""
        self.cache.clear()
        if self.fastpath is not None:
            self.fastpath.clear()


_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def runtime(backbone: Any) -> Runtime:
    """The backbone's runtime (one per backbone object, created on first use)."""
    with _LOCK:
        rt = _RUNTIMES.get(backbone)
        if rt is None:
            rt = _RUNTIMES[backbone] = Runtime(backbone, getattr(backbone, "fastpath_config", None))
        return rt
