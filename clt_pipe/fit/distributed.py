"""Data-parallel fit under torchrun: `torchrun --nproc_per_node N -m clt_pipe fit ...`.

Each rank reads its own disjoint shuffle windows of the store, gradients are averaged with one all-reduce
per parameter (not DDP's autograd hooks: the sparse decode writes decoder gradients in place, which those
hooks never see), and the dead-latent counters see every rank's firing. Rank 0 alone writes logs,
checkpoints and the exported CLT; a checkpoint holds every rank's loader position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _cpu_group: object = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def average_grads(self, params) -> None:
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        handles = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
        for h, g in zip(handles, grads):
            h.wait()
            g.div_(self.world)

    def any_rank(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a boolean tensor over ranks."""
        if not self.active:
            return mask
        m = mask.to(torch.uint8)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.bool()

    def max_int(self, value: int) -> int:
        """The largest of the ranks' ``value``, over a CPU (gloo) group: with NCCL the answer would need a
        device sync to read."""
        if not self.active:
            return value
        if self._cpu_group is None:
            self._cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return int(t.item())

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_params(self, module: torch.nn.Module) -> None:
        if self.active:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun group if there is one; returns the rank info and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device
