"""Live tensor memory of a simulated step, by phase, and what was alive at its peak.

A `TorchDispatchMode` that sees every op's outputs (fake tensors included: they carry sizes, not data) and
counts the bytes of each distinct storage from its first appearance until Python frees it (a weakref callback).
FSDP2 frees and re-allocates its unsharded parameters by resizing their storages in place, which no op reports,
so `UntypedStorage.resize_` is wrapped while tracking. The bytes are what the caching allocator is asked for
(`torch.cuda.memory_allocated`), not what it reserves: fragmentation and the CUDA context come on top (the
planner's headroom).

Each storage is labelled with the phase the caller declared when it was allocated (`with tracker.phase(...)`).
At each new peak the tracker keeps a copy of the live set, taken lazily at the first free after the peak (the
live set cannot change between the peak and that free); the caller classifies the survivors afterwards by what
they turned out to be (a gradient, an optimizer state) with `peak_breakdown`.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# op -> the category of its outputs when it is one of FSDP's communication buffers (all-gather outputs hold
# gathered parameters, reduce-scatter inputs gradients), else None; filled as ops are first seen.
_COMMUNICATION_BUFFERS: dict = {}


def storages_of(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind a tensor: its own, or a DTensor's local tensor's."""
    if hasattr(tensor, "_local_tensor"):
        tensor = tensor._local_tensor
    try:
        return [tensor.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
        return []


class _Entry:
    __slots__ = ("ref", "bytes", "label")

    def __init__(self, ref, nbytes: int, label: str):
        self.ref, self.bytes, self.label = ref, nbytes, label


class MemoryTimeline(TorchDispatchMode):
    """Counts live tensor bytes while active; `peak` is the largest total seen since `reset_peak()`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, _Entry] = {}  # id(storage) -> entry, while the storage lives
        self.total = 0
        self.peak = 0
        self._label = "other"
        self._peak_set: list[tuple[weakref.ref, int, str]] = []
        self._peak_dirty = False
        self._original_resize = None

    # -- labelling ------------------------------------------------------------------------------------

    @contextmanager
    def phase(self, label: str):
        previous, self._label = self._label, label
        try:
            yield
        finally:
            self._label = previous

    def adopt(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Count tensors that exist already (the sharded parameters before the first step), or relabel them."""
        for tensor in tensors:
            for storage in storages_of(tensor):
                entry = self.live.get(id(storage))
                if entry is None:
                    self._add(storage, label)
                else:
                    entry.label = label

    def relabel_live(self, old: str, new: str) -> None:
        """Relabel every live storage labelled `old` (what outlived a phase turned out to be something else)."""
        for entry in self.live.values():
            if entry.label == old:
                entry.label = new

    def reset_peak(self) -> None:
        self._flush_peak()
        self.peak, self._peak_set, self._peak_dirty = self.total, [], True

    # -- accounting -----------------------------------------------------------------------------------

    def _add(self, storage: torch.UntypedStorage, label: str) -> None:
        key = id(storage)
        if key in self.live:
            return
        nbytes = storage.nbytes()
        ref = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.live[key] = _Entry(ref, nbytes, label)
        self._grow(nbytes)

    def _grow(self, nbytes: int) -> None:
        self.total += nbytes
        if self.total > self.peak:
            self.peak, self._peak_dirty = self.total, True

    def _free(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        self._flush_peak()
        del self.live[key]
        self.total -= entry.bytes

    def _flush_peak(self) -> None:
        """Keep the live set of the peak just passed (called before anything shrinks)."""
        if self._peak_dirty and self.total >= self.peak:
            self._peak_set = [(e.ref, e.bytes, e.label) for e in self.live.values() if e.bytes]
            self._peak_dirty = False

    def _resized(self, storage: torch.UntypedStorage) -> None:
        entry = self.live.get(id(storage))
        if entry is None:
            self._add(storage, "gathered parameters")
            return
        change = storage.nbytes() - entry.bytes
        if change < 0:
            self._flush_peak()
        entry.bytes += change
        if change > 0:
            entry.label = "gathered parameters"
            self._grow(change)
        else:
            self.total += change

    # -- the mode ----------------------------------------------------------------------------------------

    def __enter__(self):
        self._original_resize = torch.UntypedStorage.resize_
        original, timeline = self._original_resize, self

        def resize_(storage, size):
            result = original(storage, size)
            timeline._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        label = _COMMUNICATION_BUFFERS.get(func, "")
        if label == "":
            name = str(func)
            label = ("gathered parameters" if "all_gather" in name else
                     "gradients" if "chunk_cat" in name or "reduce_scatter" in name else None)
            _COMMUNICATION_BUFFERS[func] = label
        label = label or self._label
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                for storage in storages_of(leaf):
                    self._add(storage, label)
        return out

    # -- the answer ----------------------------------------------------------------------------------------

    def peak_breakdown(self, classify: Callable[[torch.UntypedStorage], str | None]) -> dict[str, int]:
        """Bytes alive at the peak by category: `classify(storage)` names what a surviving storage turned out to
        be (None: keep the phase label it was allocated under); storages freed since keep their label."""
        self._flush_peak()
        out: dict[str, int] = {}
        for ref, nbytes, label in self._peak_set:
            storage = ref()
            category = (classify(storage) if storage is not None else None) or label
            out[category] = out.get(category, 0) + nbytes
        return out
