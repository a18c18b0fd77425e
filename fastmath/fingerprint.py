"""What a run read, by content: a fingerprint of each data file, the tokenizer and the start model.

A resumed stage must read what the checkpointed run read. Comparing paths is not enough (a training file
regenerated in place keeps its name), so every input is fingerprinted when a stage starts, stored in each
checkpoint's trainer_state.json, and compared on resume; the first file whose content differs is named.

Cost is bounded whatever the size: a file up to FULL_HASH_BYTES is hashed whole (SHA-256); a larger one by its
size and SAMPLES blocks of SAMPLE_BYTES spread evenly from the first to the last byte (4 MiB read per file, so
a 30 GB model shard costs what a 4 MiB file does). A change confined to bytes between the samples of a file
over 64 MiB is not seen; a change of size, of the start or the end, or of any sampled block is. A model folder
(weights, config, tokenizer files) is fingerprinted file by file, its top level only. An HF hub id is recorded
as its id (its content is the hub's to version).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

FULL_HASH_BYTES = 64 << 20
SAMPLES = 64
SAMPLE_BYTES = 64 << 10


def file_fingerprint(path: str | Path) -> dict:
    """{"size": bytes, "sha256": hex}: the whole file's hash up to FULL_HASH_BYTES, else of evenly spaced samples."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
            for i in range(SAMPLES):
                handle.seek(int(i * step))
                digest.update(handle.read(SAMPLE_BYTES))
    return {"size": size, "sha256": digest.hexdigest()}


def input_fingerprint(source: str) -> dict:
    """A data file, a model folder (top-level files) or an HF hub id (recorded as the id)."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"path": source, "file": file_fingerprint(path)}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return {"path": source, "files": {p.name: file_fingerprint(p) for p in files}}
    return {"hub": source}


def input_change(saved: dict | None, current: dict) -> str | None:
    """How the first input that both fingerprint sets hold differs (its key, path and what changed), or None.

    Inputs only one side holds are left to the config check (a key the checkpoint predates is not a change).
    Identity is the content: the same bytes under another path are the same input."""
    for key in sorted(set(saved or {}) & set(current)):
        old, new = saved[key], current[key]
        if not isinstance(old, dict) or not all(isinstance(v, dict) for v in old.get("files", {}).values()) \
                or not isinstance(old.get("files", {}), dict):
            return f"{key}: the checkpoint's fingerprint of it is not in the form fastmath writes"
        if _content(old) == _content(new):
            continue
        where = new.get("path") or new.get("hub")
        if "hub" in old or "hub" in new:
            return f"{key} was {old.get('path') or old.get('hub')} and is {where} now"
        if "file" in old and "file" in new:
            return f"{key} {where} has other content than when the checkpoint was made ({_detail(old['file'], new['file'])})"
        old_files, new_files = old.get("files", {}), new.get("files", {})
        for name in sorted(set(old_files) | set(new_files)):
            if name not in new_files:
                return f"{key} {where} has lost {name} since the checkpoint was made"
            if name not in old_files:
                return f"{key} {where} holds {name}, which it did not when the checkpoint was made"
            if old_files[name] != new_files[name]:
                return (f"{key} {where}: {name} has other content than when the checkpoint was made "
                        f"({_detail(old_files[name], new_files[name])})")
        return f"{key} was {old.get('path')} and is a {'file' if 'file' in new else 'folder'} {where} now"
    return None


def _content(fingerprint: dict) -> dict:
    return {k: v for k, v in fingerprint.items() if k != "path"}


def _detail(old: dict, new: dict) -> str:
    if old.get("size") != new.get("size"):
        return f"{old.get('size')} bytes then, {new.get('size')} now"
    return "same size, other bytes"
