"""Low-precision copies of a frozen backbone's Linear weights, made once and reused while the weights are unchanged.

Autocast casts a weight that does not require grad again at every use and keeps each copy for backward: a training
step (the prompt's run, then the rows') held two bf16 copies of the backbone, and scoring cast it again for every
batch. Same numbers: autocast casts these weights to the same dtype with the same rounding."""

from __future__ import annotations

import torch
from torch import nn


class WeightCasts:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.store: dict[nn.Module, tuple[tuple, torch.Tensor]] = {}

    def weight(self, linear: nn.Module) -> torch.Tensor:
        w = linear.weight
        stamp = (w.data_ptr(), w.device, w._version)  # moved, replaced or changed in place: cast again
        got = self.store.get(linear)
        if got is None or got[0] != stamp:
            got = (stamp, w.detach().to(self.dtype))
            self.store[linear] = got
        return got[1]
