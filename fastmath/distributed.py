"""Process group setup: torchrun's environment, or a one-process group when run as a plain script.

A process group always exists, so that one code path serves 1 and N processes (checkpointing with
torch.distributed.checkpoint, all-reduced metrics). Backend: NCCL on CUDA, gloo on CPU.

Timeouts (`run.dist_timeout_minutes`): every collective waits at most that long. A rank that is late (a long
generation, a hung reward worker, a dead node) would otherwise surface as an anonymous collective timeout on
the others, or as a hang; so after each rollout the ranks meet at a *monitored* barrier
(`wait_for_ranks`), which reports which ranks did not arrive. `monitored_barrier` is a gloo operation: on
CPU it runs on the default group, on CUDA on a small gloo group beside the NCCL one.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastmath.errors import FastmathError, first_line

DEFAULT_TIMEOUT_MINUTES = 60.0  # run.dist_timeout_minutes' default: a 24k-token rollout on the slowest rank, twice
_monitor: dict = {}             # the gloo group for monitored barriers and its timeout


class StalledRankError(FastmathError):
    """Some ranks did not reach a meeting point within the process-group timeout."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device; collectives wait at most
    `timeout_minutes`."""
    if "RANK" not in os.environ:  # plain `python fastmath/train.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    if world > 1 and not _monitor:
        # new_group is itself collective: every rank creates the gloo group here, at the same point.
        group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        _monitor.update(group=group, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks: one small collective, one host sync."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of one integer over ranks (e.g. micro-batches per rank, so every rank runs as many)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def wait_for_ranks(where: str) -> None:
    """Meet every rank here, or raise `StalledRankError` naming the ranks that did not come within the timeout.

    Rank 0 collects the late ranks (wait_all_ranks) and names them; a rank that arrived but lost rank 0 on the
    way says so. A one-process job returns at once."""
    if not _monitor or not dist.is_initialized():
        return
    timeout = _monitor["timeout"]
    try:
        dist.monitored_barrier(group=_monitor["group"], timeout=timeout, wait_all_ranks=True)
    except RuntimeError as err:
        minutes = f"{timeout.total_seconds() / 60:g}"
        late = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
        if late:
            ranks = ", ".join(r.strip() for r in late.group(1).split(",") if r.strip())
            raise StalledRankError(f"rank(s) {ranks} did not reach '{where}' within {minutes} min "
                                   f"(run.dist_timeout_minutes): stalled or dead; raise the timeout if the "
                                   f"work there is just slow") from None
        raise StalledRankError(f"rank {dist.get_rank()} reached '{where}' but lost the others within {minutes} min "
                               f"(run.dist_timeout_minutes): {first_line(err)}") from None


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    _monitor.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
