"""Where a stage's metrics go: `metrics.jsonl` always, TensorBoard and wandb when `run.report_to` names them.

Every backend receives the same records (one per logged step, keyed by `step`); TensorBoard and wandb get
the numeric values, under the record's own keys. Both are optional packages: naming one that is not
installed stops the stage before training with one line naming the package to install.

wandb runs offline unless `WANDB_MODE` says otherwise, so a run never needs the network; `wandb sync
<stage folder>/wandb/offline-run-*` uploads it later. TensorBoard writes `<stage folder>/tensorboard/`; a
resumed stage drops the events after its resume step (`purge_step`), so a crashed stretch is not drawn twice.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from fastmath.errors import ConfigError
from fastmath.metrics import MetricsWriter


def _numbers(record: dict) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """The metrics writers of one stage; only the main rank writes."""

    def __init__(self, jsonl: MetricsWriter, stage_dir: Path, report_to: list[str], run_name: str, stage: str,
                 config: dict, resume_step: int, enabled: bool):
        self.jsonl, self.enabled = jsonl, enabled
        self._tensorboard = self._wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            self._tensorboard = _open_tensorboard(stage_dir / "tensorboard", resume_step)
        if "wandb" in report_to:
            self._wandb = _open_wandb(stage_dir, run_name, stage, config)

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        if not self.enabled:
            return
        values, step = _numbers(record), int(record["step"])
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _open_tensorboard(log_dir: Path, resume_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("run.report_to names 'tensorboard' but the tensorboard package is not installed "
                          "(pip install tensorboard)") from None
    return SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)


def _open_wandb(stage_dir: Path, run_name: str, stage: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise ConfigError("run.report_to names 'wandb' but the wandb package is not installed "
                          "(pip install wandb)") from None
    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project="fastmath", name=f"{run_name}/{stage}", group=run_name, dir=str(stage_dir),
                      config=config, mode=mode)
