"""Resumable checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

Layout of `<output_dir>/checkpoints/step_00000120/`:
  model_and_optim/    DCP shards of the model and AdamW state (each rank writes its own shard)
  rng_rank{r}.pt      python / numpy / torch (and CUDA) RNG states of rank r, as tensors and plain values
  trainer_state.json  step, tokens seen, the resolved config, fingerprints of the inputs (fastmath/fingerprint.py)
  MANIFEST.sha256     the SHA-256 of every file above (`sha256sum -c` reads it)
  COMPLETE            written last

Durability (see fastmath/durable.py): every rank writes into `step_N.tmp/`; every file and folder is
fsynced, the manifest is written, then COMPLETE, and only then is the folder renamed to `step_N/` (an
older `step_N/` is renamed aside first and deleted last). A crash, or a power cut, at any moment leaves
the previous complete checkpoints intact and at most one unfinished `.tmp` folder, removed on resume.

Loading checks the manifest: with run.resume=auto a checkpoint that fails falls back to the previous one
(saying which file failed); a checkpoint named by path stops the run with a `CheckpointError` naming the file.
Nothing in a checkpoint folder is unpickled or run (fastmath/safe_load.py): the RNG file is read with
`weights_only=True` and DCP's metadata with a restricted unpickler. The manifest catches damage, not intent.
The data order and learning rate are pure functions of the step and the config, so (model, optimizer, RNG,
step) is the whole state of a run.

Pruning: a process deletes only checkpoints of its own run, that is those it wrote and those at or below the
step it resumed from, and never the newest of them. Checkpoints above the resume step (an older run's, or
ones that failed their check) are left alone, apart from a `step_N` this run writes again.
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_state_dict,
                                                     set_state_dict)

from fastmath.distributed import DistInfo, barrier
from fastmath.durable import (MANIFEST, files_under, fsync_tree, manifest_problem, read_manifest,
                              replace_dir_durably, settle_replacement, sha256_file, write_file_durably,
                              write_manifest)
from fastmath.errors import CheckpointError, ConfigError, first_line
from fastmath.safe_load import (SafeFileSystemReader, SafeLoadPlanner, dcp_metadata_problem, load_plain,
                                 shape_problem)

MARKER = "COMPLETE"
_STEP_NAME = re.compile(r"step_(\d+)")
_DCP_METADATA = "model_and_optim/.metadata"

# Per checkpoint root: the checkpoint folders this process's run may prune (see the module docstring).
_OWNED: dict[Path, set[Path]] = {}
# Checkpoints find_resume_point has just checked, so that load_checkpoint reads them once, not twice.
_VERIFIED: set[Path] = set()


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:08d}"


def _step_folders(output_dir: str | Path) -> list[Path]:
    """Every `step_N` folder (finished or not, `.tmp` / `.old` left out), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)),
                  key=lambda p: p.name)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    return [p for p in _step_folders(output_dir) if (p / MARKER).is_file()]


def _step_of(path: Path) -> int:
    return int(_STEP_NAME.fullmatch(path.name).group(1))


# ---- save ----------------------------------------------------------------------------------------------

def save_checkpoint(output_dir: str | Path, step: int, tokens_seen: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, config: dict, dist_info: DistInfo, keep: int,
                    inputs: dict | None = None) -> Path:
    """Write checkpoint `step`; `inputs` (fingerprints of what the run read) goes into trainer_state.json."""
    final = step_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quietly():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "model_and_optim"),
                 no_dist=_alone(dist_info))
    torch.save(_rng_state(), tmp / f"rng_rank{dist_info.rank}.pt")
    if dist_info.is_main:
        state = {"step": step, "tokens_seen": tokens_seen, "world_size": dist_info.world_size, "config": config,
                 "inputs": inputs or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
    barrier()
    fsync_tree(tmp)  # every rank: on a multi-node file system each flushes what it wrote
    digests = _hash_shared(tmp, files_under(tmp), dist_info)
    if dist_info.is_main:
        write_manifest(tmp, digests)
        write_file_durably(tmp / MARKER, "ok\n")
        replace_dir_durably(tmp, final)
        owned = _OWNED.setdefault(checkpoint_root(output_dir).resolve(), set())
        owned.add(final.resolve())
        _prune(output_dir, owned, keep)
    barrier()
    return final


def _alone(dist_info: DistInfo) -> bool:
    """True on a one-process run: DCP then skips its collectives, which change nothing with one rank but cost a
    whole run's speed on CPU. Gloo runs a collective's tensor copies on its own worker thread; the copy of a
    large enough plan is parallel, so that thread keeps an OpenMP team of torch's thread count for the rest of
    the process. libgomp then has more threads than CPUs and stops spinning at its barriers: every parallel op
    of the training thread waits on a futex instead (measured on 2 cores: 1,000 elementwise muls of 200k floats
    27 ms -> 120 ms, one futex sleep each; SFT's tokens/s ~8,600 -> ~5,000 after the first checkpoint).
    Multi-process runs keep the collectives; torchrun gives each of their processes one OpenMP thread, where
    no worker team can form."""
    return dist_info.world_size == 1


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every no_dist call that it is "assuming the intent is to save / load in a single process":
    the intent is exactly that (`_alone`), so that one warning is dropped; any other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _prune(output_dir: str | Path, owned: set[Path], keep: int) -> None:
    mine = [p for p in complete_checkpoints(output_dir) if p.resolve() in owned]
    for old in mine[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
        owned.discard(old.resolve())


def _hash_shared(root: Path, names: list[str], dist_info: DistInfo) -> dict[str, str]:
    """SHA-256 of `names` under root; rank r hashes every world_size-th file, and every rank gets the whole map."""
    mine = {name: sha256_file(root / name) for name in names[dist_info.rank::dist_info.world_size]}
    if not (dist.is_initialized() and dist_info.world_size > 1):
        return mine
    parts: list[dict | None] = [None] * dist_info.world_size
    dist.all_gather_object(parts, mine)
    return {name: digest for part in parts for name, digest in part.items()}


# ---- verify and choose ---------------------------------------------------------------------------------

def checkpoint_problem(path: str | Path, dist_info: DistInfo) -> str | None:
    """Why the checkpoint at `path` cannot be used (the file named), or None if every file matches its manifest.

    Every rank must call this; the files are split across ranks and the answer is the same on all.
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        return f"it is incomplete or not a checkpoint (no {MARKER} marker)"
    digests = read_manifest(path)
    if digests is None:
        return f"{MANIFEST} is missing or unreadable (written by an older fastmath, or damaged)"
    names = sorted(digests)
    mine = manifest_problem(path, digests, names[dist_info.rank::dist_info.world_size])
    problems = [mine]
    if dist.is_initialized() and dist_info.world_size > 1:
        problems = [None] * dist_info.world_size
        dist.all_gather_object(problems, mine)
    return next((p for p in problems if p), None)


def find_resume_point(output_dir: str | Path, mode: str, dist_info: DistInfo) -> Path | None:
    """The checkpoint a run starts from: None (a fresh start) or a folder whose files match its manifest.

    mode: 'never' (refuse if checkpoints exist), 'auto' (the newest usable one, falling back past any that
    fail their check, saying so), or a checkpoint path (used as given, or the run stops naming the bad file).
    """
    check_shared_folder(output_dir, dist_info)
    root = checkpoint_root(output_dir)
    _OWNED.pop(root.resolve(), None)  # a run starting here owns nothing yet, even after another in this process
    if dist_info.is_main and root.is_dir():
        _clean_interrupted_saves(root)
    barrier()
    folders = _step_folders(output_dir)
    if mode == "never":
        if folders:
            raise ConfigError(f"run.resume=never but {output_dir} already holds checkpoints; "
                              f"use run.resume=auto or another run.output_dir")
        return None
    if mode != "auto":
        path = Path(mode)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint not found: {path}")
        problem = checkpoint_problem(path, dist_info)
        if problem:
            raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")
        return _claim_run(output_dir, path)
    return _newest_usable(output_dir, folders, dist_info)


def check_shared_folder(folder: str | Path, dist_info: DistInfo) -> None:
    """Every rank must see what rank 0 writes in `folder` (checkpoints are written by all ranks into one folder
    and checked by all). Rank 0 writes a probe with a random token; a rank that cannot read it back, e.g. a node
    whose output_dir is a node-local disk, stops the run on every rank with one line naming those ranks."""
    if dist_info.world_size == 1:
        return
    import secrets
    import socket

    folder = Path(folder)
    token = [secrets.token_hex(8) if dist_info.is_main else None]
    dist.broadcast_object_list(token, src=0)
    probe = folder / f".fastmath-shared-probe-{token[0]}"
    if dist_info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    blind = [None] * dist_info.world_size
    dist.all_gather_object(blind, None if seen else f"{dist_info.rank} ({socket.gethostname()})")
    barrier()
    if dist_info.is_main:
        probe.unlink(missing_ok=True)
    missing = [b for b in blind if b]
    if missing:
        raise CheckpointError(f"run.output_dir {folder} is not one folder for every rank: rank(s) "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} cannot read what rank 0 "
                              f"writes there (a node-local disk?); checkpoints need a folder on a file system every "
                              f"node shares")


def _newest_usable(output_dir: str | Path, folders: list[Path], dist_info: DistInfo) -> Path | None:
    complete = [p for p in folders if (p / MARKER).is_file()]
    unfinished = [p.name for p in folders if p not in complete]
    if unfinished and not complete:
        raise CheckpointError(
            f"{checkpoint_root(output_dir)} holds checkpoint folders without a {MARKER} marker "
            f"({', '.join(unfinished)}) and no complete checkpoint; a fresh start would overwrite them: restore "
            f"the marker of one you trust, or start over with run.resume=never and a new run.output_dir")
    say = print if dist_info.is_main else (lambda *a, **k: None)
    for name in unfinished:
        say(f"fastmath: warning: {name} has no {MARKER} marker and is ignored", flush=True)
    failures = []
    for path in reversed(complete):
        problem = checkpoint_problem(path, dist_info)
        if problem is None:
            return _claim_run(output_dir, path)
        failures.append(f"{path.name}: {problem}")
        say(f"fastmath: warning: checkpoint {path} is corrupt: {problem}; "
            f"falling back to the previous complete checkpoint", flush=True)
    if failures:
        raise CheckpointError(f"checkpoint {complete[-1]} is corrupt and no older checkpoint in "
                              f"{checkpoint_root(output_dir)} passes its check either ({'; '.join(failures)}); "
                              f"restore one, or start over with run.resume=never and a new run.output_dir")
    return None


def _claim_run(output_dir: str | Path, resumed: Path) -> Path:
    """Note the checkpoint as checked (load_checkpoint need not hash it again) and mark it and the complete
    ones below it as this run's (prunable) history."""
    _VERIFIED.add(resumed.resolve())
    root = checkpoint_root(output_dir).resolve()
    owned = _OWNED.setdefault(root, set())
    if resumed.resolve().parent == root:
        step = _step_of(resumed)
        owned.update(p.resolve() for p in complete_checkpoints(output_dir) if _step_of(p) <= step)
    return resumed


def _clean_interrupted_saves(root: Path) -> None:
    """Settle replacements a crash interrupted, then drop the unfinished `.tmp` folders."""
    for aside in root.glob("step_*.old"):
        settle_replacement(aside.with_suffix(""), lambda tmp: (tmp / MARKER).is_file())
    for tmp in root.glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    dist_info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG; returns trainer_state.json."""
    path = Path(path)
    checked = path.resolve() in _VERIFIED
    _VERIFIED.discard(path.resolve())
    problem = None if checked else checkpoint_problem(path, dist_info)
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")
    if not (path / _DCP_METADATA).is_file():
        raise CheckpointError(f"checkpoint {path} is corrupt: {_DCP_METADATA} is missing")
    unsafe = dcp_metadata_problem(path / "model_and_optim")
    if unsafe:
        raise CheckpointError(f"checkpoint {path} is refused: model_and_optim/{unsafe}")
    state = _trainer_state(path)
    # Another world size is fine: DCP reshards each tensor by its global offsets as it loads. The data order and
    # the learning rate are functions of the step alone; a rank without a saved RNG state (more ranks than the
    # checkpoint's) keeps the run's seeded state, which only GRPO's explicitly seeded sampling would read.
    saved_world = state.get("world_size")
    rng_file = path / f"rng_rank{dist_info.rank}.pt"
    if saved_world != dist_info.world_size and dist_info.is_main:
        print(f"resuming a checkpoint of {saved_world} processes on {dist_info.world_size}: model and optimizer "
              f"states are resharded as they load", flush=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    target = {"model": model_state, "optim": optim_state}
    other_model = shape_problem(path / "model_and_optim", {"model": model_state})
    if other_model:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {other_model}")
    rng = None
    if rng_file.is_file() or saved_world == dist_info.world_size:
        try:
            rng = load_plain(rng_file)
            _check_rng_state(rng)
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint {path} is refused: {err}") from None
    try:
        with _single_process_quietly():
            dcp.load(target, storage_reader=SafeFileSystemReader(path / "model_and_optim"),
                     planner=SafeLoadPlanner(), no_dist=_alone(dist_info))
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"checkpoint {path} is corrupt: {_cause(err)}") from None
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    if rng is not None:
        try:
            _set_rng_state(rng)
        except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path} is refused: its RNG state is not in the form fastmath writes "
                                  f"({first_line(err)[:100]})") from None
    return state


def _trainer_state(path: Path) -> dict:
    """trainer_state.json, checked to have the form fastmath writes before any field is used."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable trainer_state.json: "
                              f"{first_line(err)[:200]}") from None
    form = {"step": int, "config": dict, "inputs": dict}
    bad = [key for key, kind in form.items()
           if key in state and not isinstance(state[key], kind) or key == "step" and key not in state] \
        if isinstance(state, dict) else ["the whole file"]
    if bad or isinstance(state.get("step"), bool) or state["step"] < 0:
        raise CheckpointError(f"checkpoint {path} has a trainer_state.json not in the form fastmath writes "
                              f"({(bad or ['step'])[0]})")
    return state


def seed_all(seed: int) -> None:
    """Seed every RNG a run draws from (python, numpy, torch); a resume then restores their saved states."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cause(err: BaseException) -> str:
    """The first line of a load failure; for DCP's wrapped exceptions (which list every rank's traceback), the
    message of the first rank's own exception, where our CheckpointError from the safe reader lands."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return first_line(inner)
    return first_line(err)


def _rng_state() -> dict:
    """Every RNG state as tensors and plain values, so that the file loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _check_rng_state(state) -> None:
    if not (isinstance(state, dict) and {"python", "numpy", "torch"} <= set(state)
            and isinstance(state["python"], list) and isinstance(state["numpy"], list)):
        raise CheckpointError("its RNG state file is not in the form fastmath writes (written by an older "
                              "fastmath, or altered)")


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


EXPORT_SHARD_BYTES = 5 * 2**30  # one safetensors file of the export, at most (transformers' default size)


def export_hf(causal_lm: torch.nn.Module, tokenizer, export_dir: str | Path, dist_info: DistInfo,
              dtype: torch.dtype | None = None, shard_bytes: int = EXPORT_SHARD_BYTES) -> Path:
    """Write a safetensors HF checkpoint (+ tokenizer) that transformers and vLLM load directly, from the shards.

    One tensor at a time is gathered from its FSDP shards (every rank takes part: `full_tensor` is collective),
    cast to `dtype` (the export dtype; None keeps each tensor's own) and handed to rank 0, which fills files of
    at most `shard_bytes` and writes each as it fills (model-0000k-of-0000n.safetensors with an index, as
    `save_pretrained` shards): rank 0 holds one file's worth of weights in host memory, never the full model in
    fp32 (59 GB at 14.8 B parameters). Everything goes to `<export_dir>.tmp` and replaces `export_dir` only when
    complete; a non-finite tensor (every rank sees the same gathered values, so all agree without a collective)
    stops the export first, so a good earlier export is never replaced by a broken one.
    """
    from safetensors.torch import save_file

    from fastmath.sharded_load import plain_name

    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tied = getattr(causal_lm.config, "tie_word_embeddings", False)
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    bad: list[str] = []
    for name, tensor in causal_lm.state_dict().items():
        key = plain_name(name)
        if tied and key.endswith("lm_head.weight"):
            continue  # the input embedding's tensor; transformers re-ties it on load
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        full = full.detach().to(dtype or full.dtype)
        if full.is_floating_point() and not bool(torch.isfinite(full).all()):
            bad.append(key)
        if not dist_info.is_main or bad:
            continue
        nbytes = full.numel() * full.element_size()
        if files[-1] and size + nbytes > shard_bytes:
            _write_export_file(tmp, files, save_file)
            files.append({})
            size = 0
        files[-1][key] = full.cpu().contiguous()
        size += nbytes
    if bad:
        if dist_info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"refusing to export non-finite weights ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}) to {export_dir}; "
                              f"any earlier export there is left as it was")
    if dist_info.is_main:
        _write_export_file(tmp, files, save_file, last=True)
        config = copy.deepcopy(causal_lm.config)
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        if getattr(causal_lm, "generation_config", None) is not None:
            causal_lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir_durably(tmp, export_dir)
    barrier()
    return export_dir


def _write_export_file(folder: Path, files: list[dict], save_file, last: bool = False) -> None:
    """Write the newest file of an export (files[-1]); at the end, name them k-of-n and write the index."""
    if files[-1]:
        save_file(files[-1], str(folder / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
        files[-1] = {name: None for name in files[-1]}  # keep the names for the index, drop the tensors
    if not last:
        return
    if len(files) == 1:
        (folder / "part-00001.safetensors").rename(folder / "model.safetensors")
        return
    weight_map = {}
    for k, names in enumerate(files, start=1):
        final = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        (folder / f"part-{k:05d}.safetensors").rename(folder / final)
        weight_map.update({name: final for name in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                    indent=2))
