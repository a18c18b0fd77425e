"""What the fused LM-head kernels (cross-entropy, GRPO) share about working a chunk of rows at a time.

Default chunk: the rows whose logits fit in a byte budget, fp32 on the PyTorch path (64 MiB), the input dtype
on the Triton path (512 MiB, rounded down to whole 128-row tensor-core tiles). d weight is accumulated in fp32
across chunks, because summing many bf16 partial products in bf16 loses the small ones.
"""
from __future__ import annotations

import torch

CHUNK_LOGITS_BYTES = 64 * 2**20
TRITON_CHUNK_LOGITS_BYTES = 512 * 2**20
# addmm(..., out_dtype=float32) multiplies 16-bit operands into an fp32 accumulator on CUDA from torch 2.8.
_ADDMM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def default_chunk_size(n: int, v: int, use_triton: bool, itemsize: int) -> int:
    """Rows per chunk for n rows of a V-wide vocabulary (itemsize: bytes of the input dtype)."""
    if not use_triton:
        return max(1, min(n, CHUNK_LOGITS_BYTES // (4 * v)))
    rows = TRITON_CHUNK_LOGITS_BYTES // (itemsize * v)
    rows = rows - rows % 128 if rows >= 128 else max(rows, 1)  # whole tensor-core tiles
    return max(1, min(n, rows))


def add_weight_grad(grad_weight32: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight32 [V, d] (fp32) += dlogits[c, V]^T @ h[c, d], with no [V, d] temporary where possible."""
    if dlogits.dtype == torch.float32:
        grad_weight32.addmm_(dlogits.T, h.float())
    elif dlogits.is_cuda and _ADDMM_OUT_DTYPE and torch.cuda.get_device_capability(dlogits.device)[0] >= 8:
        # 16-bit tensor-core matmul straight into the fp32 accumulator.
        torch.addmm(grad_weight32, dlogits.T, h, out_dtype=torch.float32, out=grad_weight32)
    else:
        grad_weight32.addmm_(dlogits.T.float(), h.float())
