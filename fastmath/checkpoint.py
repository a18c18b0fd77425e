"""Resumable checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

Layout of `<output_dir>/checkpoints/step_00000120/`:
  model_and_optim/    DCP shards of the model and AdamW state (each rank writes its own shard)
  rng_rank{r}.pt      python / numpy / torch (and CUDA) RNG states of rank r
  trainer_state.json  step, tokens seen, the resolved config
  COMPLETE            written last

Atomicity: every rank writes into `step_N.tmp/`; after a barrier rank 0 writes COMPLETE and renames
the folder to `step_N/`. A crash mid-save leaves only a `.tmp` folder (ignored and later removed), so
a folder that looks complete is complete. The data order and learning rate are pure functions of the
step and the config, so (model, optimizer, RNG, step) is the whole state of a run.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from fastmath.distributed import DistInfo, barrier
from fastmath.errors import CheckpointError, first_line

MARKER = "COMPLETE"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:08d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
             and not p.name.endswith(".tmp") and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(output_dir: str | Path, step: int, tokens_seen: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, config: dict, dist_info: DistInfo, keep: int) -> Path:
    final = step_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "model_and_optim"))
    torch.save(_rng_state(), tmp / f"rng_rank{dist_info.rank}.pt")
    barrier()
    if dist_info.is_main:
        state = {"step": step, "tokens_seen": tokens_seen, "world_size": dist_info.world_size, "config": config}
        _write_json_atomic(tmp / "trainer_state.json", state)
        (tmp / MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    dist_info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG; returns trainer_state.json."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete or not a checkpoint (no {MARKER} marker)")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable trainer_state.json: {err}") from None
    if state.get("world_size") != dist_info.world_size:
        raise CheckpointError(f"checkpoint {path} was written by {state.get('world_size')} processes; "
                              f"resuming with {dist_info.world_size} is not supported yet")
    model_state, optim_state = get_state_dict(model, optimizer)
    target = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(target, checkpoint_id=str(path / "model_and_optim"))
        rng = torch.load(path / f"rng_rank{dist_info.rank}.pt", weights_only=False)
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"checkpoint {path} is corrupt: {first_line(err)}") from None
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    _set_rng_state(rng)
    return state


def seed_all(seed: int) -> None:
    """Seed every RNG a run draws from (python, numpy, torch); a resume then restores their saved states."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def export_hf(causal_lm: torch.nn.Module, tokenizer, export_dir: str | Path, dist_info: DistInfo) -> Path:
    """Write a safetensors HF checkpoint (+ tokenizer) that transformers and vLLM load directly.

    Gathers full (unsharded) weights to rank 0's CPU; every rank must call this.
    """
    export_dir = Path(export_dir)
    full = get_model_state_dict(causal_lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_info.is_main:
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        causal_lm.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(export_dir, ignore_errors=True)
        os.replace(tmp, export_dir)
    barrier()
    return export_dir
