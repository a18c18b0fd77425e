"""Training metrics: FLOPs, MFU, peak memory, and the JSONL metrics file.

FLOPs of one training step (forward + backward = 3x forward), counting multiply-adds as 2:
  dense:     6 * P_matmul * tokens      (P_matmul: every weight used in a matmul, lm_head included)
  attention: causal QK^T and PV over each document of length L cost 2 * 2 * L^2 * d_attn / 2 forward
             (d_attn = heads * head_dim; the /2 is the causal triangle), so 6 * n_layers * d_attn * sum(L^2)
             for training.
MFU = achieved FLOP/s / peak FLOP/s of the device. The peak table holds dense bf16 tensor-core figures;
an unknown device (including every CPU) has no peak, and MFU is reported as None, never as a guess.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from fastmath.durable import write_file_durably

# Dense bf16 peak FLOP/s (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():  # most specific keys first
        if key in name:
            return value
    return None


def attention_dims(config) -> tuple[int, int]:
    """(n_layers, heads * head_dim) of an HF config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def training_flops(matmul_params: int, tokens: int, doc_lengths: list[int], n_layers: int, d_attn: int) -> float:
    dense = 6.0 * matmul_params * tokens
    attention = 6.0 * n_layers * d_attn * sum(n * n for n in doc_lengths)
    return dense + attention


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class MetricsWriter:
    """The JSONL metrics file: one JSON object per line; only rank 0 writes.

    resume_step: the step the run starts from (0 for a fresh start). The file is first cut back, atomically,
    to the records of steps <= resume_step, so steps that a killed run logged after its last checkpoint, and
    that the resumed run does again, appear once. A record whose step and keys equal those of a kept record
    replaces it (a run resumed at its last step writes its final validation record again). None: append only.
    Each line is fsynced: a step's line reaches the disk before that step's checkpoint declares it done.
    Non-finite numbers are written as null (JSON has no NaN or Infinity).
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._kept: set[tuple] = set()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._cut_back(resume_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(_json_safe(record), allow_nan=False) + "\n"
        key = _signature(record)
        if key in self._kept:
            self._kept.discard(key)
            self._rewrite([line if _signature(json.loads(old)) == key else old for old in self._lines()])
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _lines(self) -> list[str]:
        """The file's complete JSON lines (a line cut short by a killed write is dropped)."""
        if not self.path.is_file():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                json.loads(line)
            except (ValueError, RecursionError):  # a line cut short, or not JSON a writer of ours made
                continue
            kept.append(line + "\n")
        return kept

    def _cut_back(self, resume_step: int) -> None:
        lines = [line for line in self._lines() if _step(json.loads(line)) <= resume_step]
        self._kept = {_signature(json.loads(line)) for line in lines}
        if self.path.is_file():
            self._rewrite(lines)

    def _rewrite(self, lines: list[str]) -> None:
        write_file_durably(self.path, "".join(lines))


def _step(record) -> float:
    """A record's step; records without one (or not objects) are kept on a cut-back."""
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) else float("-inf")


def _signature(record) -> tuple:
    return (_step(record), tuple(sorted(record))) if isinstance(record, dict) else (None,)


def _json_safe(value):
    """`value` with every non-finite float as None and numbers of other types (numpy, 0-d tensors) as float."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    number = float(value)
    return number if math.isfinite(number) else None
