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
import resource
import sys
from pathlib import Path

import torch

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
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path: str | Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=float) + "\n")
