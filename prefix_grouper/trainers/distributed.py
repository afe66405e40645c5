"""torch.distributed plumbing of the trainers: process group, DDP wrapper, batch-wide statistics.

Every rank rolls out whole groups of its own; batch-wide quantities (advantage statistics,
loss normalizers, logged means) are computed from all ranks' rows, so a K-process run
takes the step a single process would take on the union of the K batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from .rollout import RolloutRows

__all__ = ["Distributed", "GroupedDDP", "init_distributed"]


class GroupedDDP(DistributedDataParallel):
    """DDP whose attribute reads fall through to the wrapped model (``config``, ``generate``,
    ``set_attn_implementation``), so the log-prob functions can take it like the bare model
    while their forward still goes through DDP's gradient hooks."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not registered yet (inside DDP's __init__): no fall-through
                raise
            return getattr(self.module, name)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; ``world_size == 1`` without torchrun."""
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Elementwise sum over ranks of ``values`` (float64)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_rows(self, rows: "RolloutRows") -> tuple["RolloutRows", int]:
        """Every rank's rows concatenated in rank order, and this rank's first row.

        The id fields (:attr:`RolloutRows.ID_FIELDS`: group, trajectory, anchor) become
        ``id * world_size + rank``, distinct across ranks; every other field (rewards, the
        step index ``time``...) is left as it is.
        """
        if not self.enabled:
            return rows, 0
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, rows)
        merged = type(rows).cat([self._global_ids(part, r) for r, part in enumerate(gathered)])
        first_row = sum(len(part) for part in gathered[:self.rank])
        return merged, first_row

    def _global_ids(self, rows: "RolloutRows", rank: int) -> "RolloutRows":
        return rows.map(lambda name, values: values * self.world_size + rank if name in rows.ID_FIELDS else values)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        device_ids = [model.device] if model.device.type == "cuda" else None
        return GroupedDDP(model, device_ids=device_ids)


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (gloo on CPU, nccl on CUDA).

    Returns the context and this rank's device (``cuda:LOCAL_RANK`` for a CUDA job).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    target = torch.device(device)
    if world_size == 1:
        return Distributed(), target
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size()), target
