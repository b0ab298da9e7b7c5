"""Many processes: torchrun / accelerate launch set RANK and WORLD_SIZE; each rank takes its shard of every
micro-batch and only the prompt's gradient is all-reduced (summed: the loss is already divided by the global
batch's count, so the sum over ranks is exactly the single-process gradient)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(local)
        return cls(rank=rank, world=world, local_rank=local)

    def device(self, requested: str | None) -> str | None:
        if self.world > 1 and torch.cuda.is_available() and (requested is None or str(requested).startswith("cuda")):
            return f"cuda:{self.local_rank}"
        return requested

    def all_reduce_grads(self, params) -> None:
        if self.world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
