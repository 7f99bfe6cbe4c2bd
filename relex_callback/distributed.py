"""Everything that touches ``torch.distributed`` lives here; on one process every function is a no-op.

The RELEX fit is shard-local: each process keeps the delta history of its own flat slice of every
tensor, the per-tensor Gram matrices are summed with one all-reduce, and each process combines its
own slice of the prediction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_info", "is_main_process", "all_reduce_sum", "all_reduce_grams", "partition_range"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if not _active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    return world_info()[0] == 0


def _reduce_device() -> torch.device:
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (returns a new tensor on the tensor's device)."""
    if not _active():
        return tensor
    work = tensor.to(_reduce_device()).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_grams(grams: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum many small Gram matrices over processes with a single collective."""
    if not _active() or not grams:
        return grams
    flat = torch.cat([g.reshape(-1).to(torch.float64).cpu() for g in grams])
    flat = all_reduce_sum(flat)
    out, offset = [], 0
    for gram in grams:
        out.append(flat[offset : offset + gram.numel()].view_as(gram).to(gram.device))
        offset += gram.numel()
    return out


def partition_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The flat range ``[start, stop)`` of a ``numel``-element tensor owned by ``rank`` (contiguous, balanced)."""
    base, extra = divmod(numel, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
