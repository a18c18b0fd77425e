"""Build a model on the meta device and fill each rank's FSDP shard straight from the safetensors files.

Why: loading the whole model on every rank and sharding it afterwards costs world_size full copies of host
memory per node (8 x 59 GB in fp32 for a 14.8 B model) and a full copy per rank on the way to the GPU. Here a
model is built from its config alone on the meta device (no memory), sharded with `fully_shard` while still on
meta, given empty storage for its local shards only (`to_empty`), and each rank then reads exactly the rows of
each tensor that its shard holds (safetensors reads slices without reading the rest of the file). A node then
reads and holds about one copy of the weights in total, spread over its ranks, plus one tensor's slice in flight.

Two things meta construction loses are put back:
    - non-persistent buffers (the rotary embedding's inverse frequencies): they are not in the checkpoint and
      were computed on meta; each module that owns one is rebuilt on the CPU from its config (cheap: buffers
      only) and its buffers copied over. A non-persistent buffer outside a rotary module is refused by name,
      since nothing could fill it.
    - tied weights: the output embedding shares the input embedding's tensor, so the file has one of the two.

Weights must be safetensors (`*.safetensors`, single file or with `model.safetensors.index.json`): `.bin` files
are pickles, which fastmath never loads from a model folder (it would run code from data).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fastmath.errors import ModelError

INDEX = "model.safetensors.index.json"


def plain_name(name: str) -> str:
    """A parameter's name as the checkpoint spells it (wrappers of compile / checkpointing removed)."""
    return name.removeprefix("_orig_mod.").replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


def build_on_meta(path: str, attn_implementation: str, trust_remote_code: bool, dtype: torch.dtype) -> nn.Module:
    """The model of `path`'s config.json, every parameter and buffer on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(f"could not read the model config of {path}: {err}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    return model


def weight_files(path: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    folder = Path(path)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{index} is not a readable safetensors index: {err}") from None
        files = {}
        for name, file in weight_map.items():
            target = (folder / str(file)).resolve()
            if folder.resolve() not in target.parents:  # a path read from a file stays inside its folder
                raise ModelError(f"{index} names {file!r} for {name}, outside the model folder")
            files[name] = target
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}
    if any(folder.glob("*.bin")):
        raise ModelError(f"{path} holds only .bin (pickle) weights; sharded loading reads safetensors only "
                         f"(pickles run code when loaded): convert the folder with save_pretrained(..., "
                         f"safe_serialization=True)")
    raise ModelError(f"{path} has no safetensors weights (model.safetensors or {INDEX})")


def _local_region(tensor: torch.Tensor) -> tuple[torch.Tensor, list[slice]]:
    """This rank's local tensor and the slice of the global tensor it holds (all of it for a plain tensor)."""
    if not hasattr(tensor, "to_local"):
        return tensor, [slice(0, n) for n in tensor.shape]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return local, [slice(o, o + n) for o, n in zip(offset, shape)]


def _restore_rotary_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers a meta build left empty (rotary modules, rebuilt from their config)."""
    for name, module in model.named_modules():
        non_persistent = [b for b in module._buffers if b in module._non_persistent_buffers_set]
        if not non_persistent:
            continue
        if not hasattr(module, "config") or "Rotary" not in type(module).__name__:
            raise ModelError(f"{type(module).__name__} at {name or 'the root'} has buffers that are not in the "
                             f"checkpoint ({', '.join(non_persistent)}); sharded loading cannot fill them")
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for buffer in non_persistent:
            module._buffers[buffer] = getattr(fresh, buffer).to(device)


@torch.no_grad()
def materialize_from_safetensors(causal_lm: nn.Module, path: str, device: torch.device) -> None:
    """Give the (sharded, meta) model storage on `device` and read each rank's rows from `path`'s safetensors.

    Every parameter's local shard is a contiguous block of rows (FSDP2 shards dim 0), so a rank reads
    rows [start, stop) of each tensor: about (1 / ranks) of the file per rank, cast to the parameter's dtype.
    """
    from safetensors import safe_open

    causal_lm.to_empty(device=device)
    _restore_rotary_buffers(causal_lm, device)
    files = weight_files(path)
    state = causal_lm.state_dict()
    # With tied embeddings the output embedding is the input embedding's tensor: the file may lack it.
    tied = {plain_name(n) for n in state if plain_name(n).endswith("lm_head.weight")} \
        if getattr(causal_lm.config, "tie_word_embeddings", False) else set()
    missing = [plain_name(n) for n in state if plain_name(n) not in files and plain_name(n) not in tied]
    if missing:
        raise ModelError(f"{path}'s safetensors lack {len(missing)} tensor(s) the model needs, first: {missing[0]}")
    handles: dict[Path, object] = {}
    try:
        for name, tensor in state.items():
            key = plain_name(name)
            if key in tied and key not in files:
                continue
            file = files[key]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt").__enter__()
            piece = handles[file].get_slice(key)
            if list(piece.get_shape()) != list(tensor.shape):
                raise ModelError(f"{key} in {file.name} has shape {piece.get_shape()}, the model's config "
                                 f"gives {list(tensor.shape)}")
            local, region = _local_region(tensor)
            if local.numel():
                local.copy_(piece[tuple(region)].to(local.dtype))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
