"""Running a model pass on several processes: `torchrun ... -m curator fit|score|sketch`.

Every rank runs the same command. The documents are cut into the same chunks as in one
process (the chunk is the unit of output and of resuming); rank 0 decides which chunks
are still to do and hands them out balanced by tokens; each rank runs the shared document
pass over its own chunks. What ranks must agree on goes through rank 0: the plan,
prepared queries, eigenbases, and the sums that are all-reduced. Only rank 0 writes the
DuckDB catalog (DuckDB allows one writer), after every rank has closed its read-only
connection.

Without torchrun (no WORLD_SIZE in the environment) everything here is the identity and
curator runs in one process as before.

Collectives use gloo for CPU tensors and NCCL for CUDA tensors (one process group with a
backend per device). A rank that raises makes its process exit; torchrun then stops the
others and reports that rank's error. The process group's timeout is the backstop for a
rank that hangs instead: `CURATOR_DIST_TIMEOUT` seconds (default 2 hours, longer than the
wait of a fast rank for a slow one at the end of a pass over a large shard).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_TIMEOUT_S = 7200


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world` (local rank on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device: str) -> str:
        """The device this rank uses for the command's `--device`: `cuda` means this rank's own GPU
        (made the current one, which NCCL's collectives use)."""
        if not self.distributed or not device.startswith("cuda"):
            return device
        if device != "cuda":
            from curator.errors import CuratorError
            raise CuratorError(f"--device {device}: under torchrun give --device cuda; each rank takes the GPU of "
                               f"its local rank")
        if self.local_rank >= torch.cuda.device_count():
            from curator.errors import CuratorError
            raise CuratorError(f"rank {self.rank} has local rank {self.local_rank} but this node has "
                               f"{torch.cuda.device_count()} GPUs; start at most that many processes per node")
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place (and returned)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_sum(self, number: int | float) -> int | float:
        if not self.distributed:
            return number
        total = torch.tensor([number], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return type(number)(total.item())

    def share(self, value, device: str | torch.device = "cpu"):
        """Rank 0's `value` on every rank (other ranks pass anything, usually None).

        The structure travels pickled; every tensor inside travels on its own, by a broadcast on
        `device` (NCCL for CUDA, gloo for the CPU), so eigenbases or prepared queries of a large
        model never exist as one pickle. Tensors arrive on `device`.
        """
        if not self.distributed:
            return _to_device(value, device)
        tensors: list[torch.Tensor] = []
        skeleton = _strip_tensors(value, tensors) if self.main else None
        box = [(skeleton, [(t.shape, t.dtype) for t in tensors]) if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        skeleton, specs = box[0]
        received = []
        for number, (shape, dtype) in enumerate(specs):
            tensor = (tensors[number].to(device).contiguous() if self.main
                      else torch.empty(shape, dtype=dtype, device=device))
            torch.distributed.broadcast(tensor, src=0)
            received.append(tensor)
        return _fill_tensors(skeleton, received)

    def gather(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [value]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(value, out, dst=0)
        return out


SINGLE = Ranks()


def current() -> Ranks:
    """The job this process is part of (rank 0 of 1 outside torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start() -> Ranks:
    """Join the job torchrun started (a no-op without one)."""
    if not launched_by_torchrun() or torch.distributed.is_initialized():
        return current()
    timeout = datetime.timedelta(seconds=float(os.environ.get("CURATOR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return current()


def stop() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def assign(costs: Sequence[float], world: int) -> list[list[int]]:
    """Chunk numbers per rank: the largest chunk first to the least loaded rank (ties: lower rank).

    Deterministic for the same costs and world size; each rank's list is in chunk order.
    """
    loads = [0.0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for number in sorted(range(len(costs)), key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += costs[number]
        owned[rank].append(number)
    return [sorted(numbers) for numbers in owned]


class _Slot:
    """Where a tensor was, in a structure sent without its tensors."""

    def __init__(self, number: int):
        self.number = number


def _strip_tensors(value, found: list):
    if isinstance(value, torch.Tensor):
        found.append(value)
        return _Slot(len(found) - 1)
    return _map(value, lambda item: _strip_tensors(item, found))


def _fill_tensors(value, tensors: list):
    if isinstance(value, _Slot):
        return tensors[value.number]
    return _map(value, lambda item: _fill_tensors(item, tensors))


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return _map(value, lambda item: _to_device(item, device))


def _map(value, function):
    """`function` applied inside dicts, lists, tuples and dataclasses; other values as they are."""
    if isinstance(value, dict):
        return {key: function(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(function(item) for item in value)
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        import dataclasses
        return dataclasses.replace(value, **{f.name: function(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value
