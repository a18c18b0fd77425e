"""The wire format of server-mode weight sync, shared by the trainer (sender) and the vLLM server (receiver).

Server mode moves the trainer's full weights into one or more vLLM servers after every optimizer step, over a
torch.distributed group of its own that spans the trainer's sender process (rank 0) and every server worker
(ranks 1..N): gloo on CPU, NCCL on CUDA. The group is separate from the trainer's FSDP group and from vLLM's own
groups: it is built from a TCPStore that the trainer hosts and the server workers join, and a process-group
object made directly on that store, so neither side's default process group is touched.

One bucket = consecutive tensors of the model, packed as raw bytes (each at a 16-byte aligned offset) into one
flat uint8 buffer and broadcast once
from rank 0. The receiver learns a bucket's layout (names, dtypes, shapes) from the HTTP request that
accompanies it (vLLM's `/update_weights`), then cuts the same buffer back into tensors. Bytes moved per bucket:
its size, once per receiver (a broadcast); one collective per bucket instead of one per tensor.

Nothing here imports vLLM: the trainer may run without it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class BucketLayout:
    """What the receiver needs to cut one broadcast buffer back into named tensors (JSON-able)."""

    names: list[str]
    dtype_names: list[str]  # torch dtype names without the "torch." prefix
    shapes: list[list[int]]

    def spans(self) -> list[tuple[int, int]]:
        """(byte offset, byte size) of each tensor; offsets are multiples of 16 so that every slice can be
        viewed as its dtype (a view needs its offset divisible by the element size)."""
        out, at = [], 0
        for dtype_name, shape in zip(self.dtype_names, self.shapes):
            size = _numel(shape) * getattr(torch, dtype_name).itemsize
            out.append((at, size))
            at += -(-size // _ALIGN) * _ALIGN
        return out

    @property
    def nbytes(self) -> int:
        """The buffer's size: the last span's end (the padding between tensors is never read)."""
        spans = self.spans()
        return spans[-1][0] + spans[-1][1] if spans else 0


_ALIGN = 16


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def pack_bucket(tensors: list[tuple[str, torch.Tensor]], device: torch.device) -> tuple[BucketLayout, torch.Tensor]:
    """(layout, one flat uint8 buffer on `device` holding every tensor's bytes in order)."""
    layout = BucketLayout([n for n, _ in tensors], [str(t.dtype).removeprefix("torch.") for _, t in tensors],
                          [list(t.shape) for _, t in tensors])
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)  # zeros: the padding is defined bytes
    for (_, t), (at, size) in zip(tensors, layout.spans()):
        flat[at:at + size].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return layout, flat


def unpack_bucket(layout: BucketLayout, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copy), one per tensor of the layout."""
    out = []
    for name, dtype_name, shape, (at, size) in zip(layout.names, layout.dtype_names, layout.shapes, layout.spans()):
        out.append((name, flat[at:at + size].view(getattr(torch, dtype_name)).reshape(shape)))
    return out


def open_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
    """A process group of its own over a TCPStore at host:port (rank 0 hosts the store).

    Made without `init_process_group`, so the caller's default group (the trainer's FSDP group, or vLLM's own)
    is left alone. `timeout_s` bounds the rendezvous and every collective on the group: a peer that died
    turns into an error after that long instead of a hang."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore("fastmath_weight_sync", store)
    if backend == "gloo":
        group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        raise ValueError(f"weight sync backend must be gloo or nccl, not {backend!r}")
    return WeightGroup(group, store)


@dataclass
class WeightGroup:
    group: object  # a ProcessGroupGloo / ProcessGroupNCCL
    store: object  # kept alive as long as the group: gloo keeps using it for its connections


def broadcast_bucket(group: WeightGroup, flat: torch.Tensor) -> None:
    """Rank 0 sends `flat`; the others receive into it (same size, from the layout)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.group.broadcast([flat], options).wait()
