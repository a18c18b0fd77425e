"""The GPUs the memory planner can plan for: memory, and the rates its step-time estimate assumes.

Memory is what `nvidia-smi` reports as the card's total (the allocator gets a little less: the CUDA context
takes ~0.5 GiB per process, which the planner's required headroom covers). Rates are the vendors' data-sheet
peaks: dense bf16 tensor-core FLOP/s, HBM bandwidth, and NVLink bandwidth per GPU per direction.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastmath.errors import ConfigError

GiB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int
    bf16_flops: float
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # NVLink, per GPU and direction


GPUS = {
    "h100-80gb": GPUSpec("NVIDIA H100 SXM 80 GB", 81_559 * 2**20, 989e12, 3.35e12, 450e9),
    "h200": GPUSpec("NVIDIA H200 SXM 141 GB", 143_771 * 2**20, 989e12, 4.8e12, 450e9),
    "a100-80gb": GPUSpec("NVIDIA A100 SXM 80 GB", 81_920 * 2**20, 312e12, 2.04e12, 300e9),
}


def gpu_spec(name: str) -> GPUSpec:
    key = name.lower()
    if key not in GPUS:
        raise ConfigError(f"unknown GPU '{name}' for the memory plan; known: {', '.join(GPUS)}")
    return GPUS[key]


def gpu_named_in(header: str) -> str | None:
    """The GPU a config's header names ('8x H100 80 GB', '8x H200'), as a GPUS key, or None."""
    text = header.lower().replace(" ", "")
    for key, marker in (("h200", "h200"), ("h100-80gb", "h10080gb"), ("a100-80gb", "a10080gb")):
        if marker in text:
            return key
    return None
