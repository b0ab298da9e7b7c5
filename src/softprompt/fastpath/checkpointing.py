"""Activation checkpointing for one forward over a prompt cache: each decoder layer keeps only its input and is
recomputed in backward (torch.utils.checkpoint, non-reentrant). The layers' forward is replaced on the instances for
the duration of the call and restored after; the cache layers are made non-growing so that a recompute sees the
same prompt keys/values as the forward did."""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn


def decoder_layers(base: nn.Module) -> nn.ModuleList | None:
    """The stack of decoder layers: the ModuleList of the base model with one entry per hidden layer."""
    n = base.config.get_text_config().num_hidden_layers
    stacks = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    return stacks[0] if stacks else None


def _prefix_update(self, key_states, value_states, *args, **kwargs):
    """(prompt ++ new) returned, not stored: a checkpointed layer recomputed in backward sees the same cache."""
    return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextlib.contextmanager
def checkpointed_layers(base: nn.Module, cache, reenter=contextlib.nullcontext):
    """Within the block, `base`'s decoder layers recompute in backward. `reenter()` is entered around each
    recompute (the forward's kernel choices apply to it again). An unknown layout or a sliding-window cache: no
    checkpointing, same results."""
    from torch.utils.checkpoint import checkpoint
    from transformers.cache_utils import DynamicLayer

    layers = decoder_layers(base)
    if layers is None or not all(type(layer) is DynamicLayer for layer in cache.layers):
        yield
        return
    for layer in cache.layers:
        layer.update = partial(_prefix_update, layer)

    def run(forward, *args, **kwargs):
        with reenter():
            return forward(*args, **kwargs)

    for layer in layers:
        layer.forward = partial(checkpoint, partial(run, layer.forward), use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
