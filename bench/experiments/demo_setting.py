"""Which recorded runs are `make demo` as configs/demo.yaml sets it today.

A run's own config.json (every run folder has one, fully resolved) is reduced to its *setting*: the flat
`section.key -> value` pairs that can change what the run learns or measures. Left out: where it writes and
how it resumes (`run.*` except the seed's absence: each record spans seeds), checkpoint cadence, the eval and
scheduler stages (the demo runs neither), and the rollout engine's plumbing (which engine samples, vLLM's memory
and compile settings, server mode): records name the engine they used separately. The SFT rows given as the
file `train-verbose<F>.jsonl` that `bench/experiments/toy_levers.py` writes count as `data.train: embedded`
with `data.embedded_verbose_fraction: F`: a test holds the two to the same bytes.

Keys renamed since a record was written are read under their new names (fastmath.config.RENAMED), and two
settings match when they agree on every key both have: a field added later, at a default that keeps the old
behaviour, does not orphan the records before it.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastmath.config import RENAMED, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

_IGNORED_SECTIONS = ("run.", "checkpoint.", "eval.", "scheduler.")
# The rollout engine and its plumbing: the same recipe whichever samples (records say which did).
_ENGINE = re.compile(r"^grpo\.(rollout\.)?(generator|vllm_[a-z_]+|sync_bucket_mib|server_[a-z_]+)$")
_VERBOSE_FILE = re.compile(r"train-verbose([0-9.]+)\.jsonl$")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def setting_of(config: dict) -> dict[str, Any]:
    """The setting of one resolved config (a run's config.json, or a config as loaded)."""
    flat = {RENAMED.get(k, k): v for k, v in flatten(config).items()}
    train = flat.get("data.train")
    found = _VERBOSE_FILE.search(str(train)) if train is not None else None
    if found:
        flat["data.train"] = "embedded"
        flat["data.embedded_verbose_fraction"] = float(found.group(1))
    return {k: v for k, v in sorted(flat.items())
            if not k.startswith(_IGNORED_SECTIONS) and not _ENGINE.match(k)}


def demo_setting(path: Path = DEMO_CONFIG) -> dict[str, Any]:
    return setting_of(to_dict(load_config(path)))


def differences(setting: dict, reference: dict) -> dict[str, tuple[Any, Any]]:
    """Keys both settings have whose values differ: {key: (setting's, reference's)}."""
    return {k: (setting[k], reference[k]) for k in setting.keys() & reference.keys() if setting[k] != reference[k]}


def is_demo(setting: dict | None, reference: dict | None = None) -> bool:
    """Whether a record's setting is the demo's (a record written before settings were kept is not)."""
    return bool(setting) and not differences(setting, reference if reference is not None else demo_setting())


def setting_at_commit(commit: str, command: str) -> dict[str, Any]:
    """The setting a recorded run had, rebuilt from git: `commit`'s own config loader on its own configs with the
    run's recorded arguments (`fastmath/train.py --config X key=value ...`). For records written before runs
    kept their setting; the loader of that commit, not today's, resolves the defaults it ran with."""
    words = shlex.split(command)
    config = words[words.index("--config") + 1]
    overrides = [w for w in words[words.index("--config") + 2:] if "=" in w and not w.startswith("run.")]
    with tempfile.TemporaryDirectory(prefix="setting-") as old:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "fastmath", "configs"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from fastmath.config import load_config, "
                  "to_dict; print(json.dumps(to_dict(load_config(sys.argv[2], sys.argv[3:]))))")
        done = subprocess.run([sys.executable, "-c", script, old, f"{old}/{config}", *overrides], cwd=old,
                              capture_output=True, text=True, check=True)
    return setting_of(json.loads(done.stdout.strip().splitlines()[-1]))


def backfill(path: Path) -> int:
    """Give every row of the record file at `path` that lacks a setting the one rebuilt at its record's commit."""
    records, cache, filled = json.loads(path.read_text()), {}, 0
    for record in records:
        for row in record.get("results") or []:
            if row.get("setting") is not None or not record.get("git_commit") or "--config" not in row.get(
                    "command", ""):
                continue
            key = (record["git_commit"], " ".join(w for w in row["command"].split() if not w.startswith("run.")))
            if key not in cache:
                cache[key] = setting_at_commit(record["git_commit"], row["command"])
            row["setting"], row["setting_from"] = cache[key], f"rebuilt at {record['git_commit'][:7]}"
            filled += 1
    path.write_text(json.dumps(records, indent=1) + "\n")
    return filled


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild the setting of recorded runs that lack one.")
    parser.add_argument("--backfill", type=Path, nargs="+", required=True, help="record files (bench/results)")
    for name in parser.parse_args().backfill:
        print(f"{name}: {backfill(name)} rows given their setting")
