"""Reading a checkpoint folder without running code from it: a checkpoint folder is data, not code.

Whoever can write a checkpoint folder can also rewrite its `MANIFEST.sha256` (a checksum catches damage, not
intent), so every file in it is read as if it were hostile:
  * `rng_rank{r}.pt` holds only tensors and plain Python values and is read with `torch.load(weights_only=True)`,
    PyTorch's unpickler that builds tensors, numbers, strings and containers and nothing else.
  * DCP's `model_and_optim/.metadata` is a pickle that torch.distributed.checkpoint (torch 2.13:
    `FileSystemReader.read_metadata`) reads with plain `pickle.load`, which can call any importable function.
    `SafeFileSystemReader` reads it with `_MetadataUnpickler`, which resolves only the classes DCP writes there
    (the dataclasses of `torch.distributed.checkpoint.metadata`, `_StorageInfo`, `torch.Size`, dtypes, layouts,
    `pathlib` paths) and refuses every other global; and it checks that every shard file the metadata names is a
    plain file name inside the folder.
  * The non-tensor values of the state dict (the optimizer's hyper-parameters) are stored by DCP as `torch.save`
    bytes, which its `DefaultLoadPlanner.load_bytes` reads with `weights_only=False`; `SafeLoadPlanner` reads them
    with `weights_only=True`. Tensors themselves DCP already reads with `weights_only=True`.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element

from fastmath.durable import is_plain_relative
from fastmath.errors import CheckpointError, first_line

# The globals a DCP `.metadata` pickle written by torch 2.13 refers to (seen with pickletools on a saved model and
# AdamW state); anything else in the file is refused.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by its name among torch's layouts
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}
# A DCP metadata file of a 14B model over 8 ranks is a few MB; anything far above is not one.
MAX_METADATA_BYTES = 256 << 20


class _MetadataUnpickler(pickle.Unpickler):
    """pickle, resolving only DCP's metadata classes and torch dtypes."""

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a DCP metadata file never holds")


def read_dcp_metadata(data: bytes):
    """The DCP Metadata object from the bytes of a `.metadata` file, built by the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not is_plain_relative(name) or "/" in name:
            raise pickle.UnpicklingError(f"it names the shard file {name[:80]!r}, which is not a file in its folder")
    return metadata


def dcp_metadata_problem(folder: str | Path, rank: int | None = None) -> str | None:
    """Why the DCP metadata in `folder` cannot be read safely (named), or None. Called before DCP reads it, so
    the refusal is one clear line rather than DCP's per-rank report."""
    name = ".metadata" if rank is None else f"__{rank}.metadata"
    path = Path(folder) / name
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            return f"{name} is larger than {MAX_METADATA_BYTES >> 20} MiB, which no DCP metadata is"
        read_dcp_metadata(path.read_bytes())
    except OSError as err:
        return f"{name} cannot be read: {err.strerror or first_line(err)}"
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError,
            MemoryError, RecursionError) as err:
        return f"{name} is refused unread: {first_line(err)[:200]} (nothing in a checkpoint folder is run)"
    return None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with the `.metadata` pickle read by `_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        problem = dcp_metadata_problem(self.path, rank)
        if problem:
            raise CheckpointError(problem)
        metadata = read_dcp_metadata(Path(self._get_metadata_path(rank)).read_bytes())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading the state dict's non-tensor values with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_plain(path: str | Path):
    """A `.pt` file of tensors and plain values (torch.load weights_only=True: no code runs); CheckpointError
    naming the file when it holds anything else."""
    path = Path(path)
    try:
        return torch.load(path, weights_only=True)
    except OSError:
        raise
    except Exception:  # weights_only's refusal of a global (UnpicklingError), or a file that is no pickle at all
        raise CheckpointError(f"{path.name} is not tensors and plain values as fastmath writes them, and is "
                              f"refused unread (nothing in a checkpoint folder is run)") from None


def shape_problem(folder: str | Path, state: dict) -> str | None:
    """The first tensor of `state` (a nested state dict, as DCP flattens it) whose shape differs from the one
    stored in `folder`'s DCP metadata, or that the checkpoint lacks; None when every shape matches. Read through
    the restricted unpickler; call after `dcp_metadata_problem` found none."""
    stored = read_dcp_metadata((Path(folder) / ".metadata").read_bytes()).state_dict_metadata

    def walk(prefix: str, node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, torch.Tensor):
            yield prefix, tuple(node.size())

    for fqn, shape in walk("", state):
        meta = stored.get(fqn)
        if meta is None:
            return f"it holds no {fqn} (a checkpoint of another model)"
        saved = tuple(getattr(meta, "size", ()))
        if saved != shape:
            return f"{fqn} is {list(saved)} there and {list(shape)} in this model (a checkpoint of another model size)"
    return None
