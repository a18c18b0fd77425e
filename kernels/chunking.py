"""What the fused LM-head kernels (cross-entropy, GRPO) share about working a chunk of rows at a time.

Default chunk: the rows whose logits fit in a byte budget, fp32 on the PyTorch path (64 MiB), the input dtype
on the Triton path (512 MiB, rounded down to whole 128-row tensor-core tiles); `chunk_bytes` sets another budget.
d weight is accumulated in fp32 across chunks, because summing many bf16 partial products in bf16 loses the
small ones.

Why a larger budget can pay on a GPU: k = ceil(N / c) chunks make about 2k passes over the [V, d] fp32
accumulator (each chunk after the first reads and writes it), 2.5 GB per pass at V = 152k, d = 4096. At N = 16k
rows of bf16, 512 MiB is c = 1,664 and k = 10: about 47 GB of traffic, ~14 ms at 3.35 TB/s, beside the 6NdV =
61 TFLOP of matmuls (~90 ms at ~700 TFLOP/s). 2 GiB (c = 7,040, k = 3) cuts the traffic to ~12 GB for 1.5 GiB
more memory. The default stays 512 MiB until a GPU run of bench/bench_cross_entropy.py --chunk-mib says more.
"""
from __future__ import annotations

import torch
from torch.torch_version import TorchVersion

CHUNK_LOGITS_BYTES = 64 * 2**20
TRITON_CHUNK_LOGITS_BYTES = 512 * 2**20
# Rows of a chunk's logits buffer start every multiple of 16 elements (32 bytes in 16-bit): with V = 50257 or
# 32003 an unpadded row stride leaves every row but the first misaligned, and the row kernels' loads fall back
# to one 16-bit element per instruction. Triton specialises an integer argument divisible by 16 on its own.
ROW_STRIDE_MULTIPLE = 16
# `torch.addmm(fp32 acc, a16, b16, out_dtype=torch.float32)` (cuBLAS: 16-bit operands, fp32 accumulate and
# output) exists on CUDA since torch 2.8, but 2.8 and 2.9 require `self` (the accumulator) to have the
# operands' dtype; pytorch/pytorch#167931 (Nov 2025, first released in 2.10) accepts an fp32 `self`.
ADDMM_FP32_SELF_SINCE = "2.10"


def padded_row_stride(v: int) -> int:
    """The row stride (elements) of a chunk's [c, V] logits buffer: V rounded up to ROW_STRIDE_MULTIPLE."""
    return -(-v // ROW_STRIDE_MULTIPLE) * ROW_STRIDE_MULTIPLE


# Vocabulary tiles of the row kernels: powers of two up to 8192 (16 elements per thread at 16 warps: two 16-byte
# loads of 16-bit logits), never wasting more than an eighth of a row on the masked tail of the last tile.
MAX_BLOCK_V = 8192
ELEMENTS_PER_THREAD = 16


def row_tile(v: int, max_block: int = MAX_BLOCK_V) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of a row kernel over V columns: the largest power-of-two tile up to MAX_BLOCK_V whose
    tiles cover V with at most V / 8 of padding (V = 50257: 4096, 13 tiles, 6% padding; 8192 would pad 14%),
    and as many warps as give each thread ELEMENTS_PER_THREAD elements of the tile (1 to 16). `max_block` (a
    power of two) lowers the cap: the interpreted tests use it to cross tile edges at small V."""
    block = min(max_block, 1 << max(v - 1, 0).bit_length())
    while block > 1024 and (-(-v // block) * block - v) * 8 > v:
        block //= 2
    return block, max(1, min(16, block // (32 * ELEMENTS_PER_THREAD)))


def new_rows(like: torch.Tensor, rows: int, stride: int) -> torch.Tensor:
    """The uninitialised [rows, stride] storage behind `logits_buffer` (one place, so a test can poison it)."""
    return like.new_empty((rows, stride))


def logits_buffer(like: torch.Tensor, rows: int, v: int) -> torch.Tensor:
    """A [rows, V] view of `like`'s dtype and device whose rows start at 32-byte boundaries.

    The view's values are uninitialised (each chunk's matmul writes them), but the padding between rows
    (stride - V elements per row) is zeroed: a matmul on a row-strided operand may read whole blocks across it
    (a CPU bf16 matmul was seen to), and uninitialised bits there can be NaN, which 0 * NaN spreads into the
    gradient. The Triton row kernels never read it (their loads are masked to V). Cost: rows * (stride - V)
    elements, under 16 per row."""
    stride = padded_row_stride(v)
    buf = new_rows(like, rows, stride)
    buf[:, v:].zero_()
    return buf[:, :v]


def default_chunk_size(n: int, v: int, use_triton: bool, itemsize: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk for n rows of a V-wide vocabulary (itemsize: bytes of the input dtype): as many as keep
    one chunk's logits within `chunk_bytes` (default: 64 MiB of fp32 on the PyTorch path, 512 MiB of the input
    dtype on the Triton path, whose rows are also rounded down to whole 128-row tensor-core tiles); at least 1."""
    if not use_triton:
        return max(1, min(n, (chunk_bytes or CHUNK_LOGITS_BYTES) // (4 * v)))
    rows = (chunk_bytes or TRITON_CHUNK_LOGITS_BYTES) // (itemsize * v)
    rows = rows - rows % 128 if rows >= 128 else max(rows, 1)  # whole tensor-core tiles
    return max(1, min(n, rows))


def weight_grad_method(dtype: torch.dtype, tensor_cores: bool, torch_version: str = torch.__version__) -> str:
    """How `add_weight_grad` multiplies a chunk of `dtype` into the fp32 accumulator:

    "fp32":          operands in the accumulator's dtype (fp32 inputs, float64 ones on the reference path; and
                     16-bit ones without CUDA tensor cores: CPU, pre-Ampere).
    "addmm_fp32":    16-bit operands straight into the fp32 accumulator, one cuBLAS call (torch >= 2.10).
    "16bit_then_add": a 16-bit product (fp32 accumulation inside cuBLAS, rounded once) added to the accumulator:
                     a [V, d] 16-bit temporary, but tensor cores, where the fp32-self addmm is refused. An fp32
                     matmul instead would be about 10x slower for this, the largest matmul of the step.
    """
    if dtype in (torch.float32, torch.float64) or not tensor_cores:
        return "fp32"
    if TorchVersion(torch_version.split("+")[0]) >= ADDMM_FP32_SELF_SINCE:
        return "addmm_fp32"
    return "16bit_then_add"


def add_weight_grad(
    grad_weight32: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, overwrite: bool = False
) -> None:
    """grad_weight32 [V, d] (fp32) += dlogits[c, V]^T @ h[c, d], with no [V, d] temporary where possible.

    overwrite=True (the first chunk) writes the product instead of adding it, so the accumulator can start
    uninitialised (`weight_grad_accumulator`): beta = 0 tells the matmul not to read it (NaN bits included).
    That saves a zero-fill and one read of the accumulator, 2 of the ~2k + 1 passes over its V d fp32 values
    that k chunks make: 2.5 GB each at V = 152k, d = 4096."""
    # 16-bit tensor cores from compute capability 8.0 (bf16 needs them; older GPUs take the fp32 path).
    tensor_cores = dlogits.is_cuda and torch.cuda.get_device_capability(dlogits.device)[0] >= 8
    method = weight_grad_method(dlogits.dtype, tensor_cores)
    beta = 0 if overwrite else 1
    if method == "fp32":
        grad_weight32.addmm_(dlogits.T.to(grad_weight32.dtype), h.to(grad_weight32.dtype), beta=beta)
    elif method == "addmm_fp32":
        torch.addmm(grad_weight32, dlogits.T, h, out_dtype=torch.float32, beta=beta, out=grad_weight32)
    elif overwrite:
        grad_weight32.copy_(dlogits.T @ h)
    else:
        grad_weight32.add_(dlogits.T @ h)


def accumulate_chunk_grads(dlogits, h, w, rows: slice, grad_hidden, grad_weight_acc) -> None:
    """One chunk's rows of d hidden (dlogits @ w) and its share of d weight (`add_weight_grad`), either None
    when not needed. The chunk at row 0 overwrites the uninitialised accumulator (`weight_grad_accumulator`)."""
    if grad_hidden is not None:
        grad_hidden[rows] = dlogits @ w
    if grad_weight_acc is not None:
        add_weight_grad(grad_weight_acc, dlogits, h, overwrite=rows.start == 0)


def weight_grad_accumulator(param: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """The [V, d] accumulator `add_weight_grad` fills over `rows` rows of chunks: uninitialised when a first
    chunk will overwrite it, zeros when there are no rows (the gradient of an empty batch is 0)."""
    make = torch.empty if rows > 0 else torch.zeros
    return make(param.shape, dtype=dtype, device=param.device)


def check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, chunk_size, chunk_bytes=None) -> tuple[int, int, int]:
    """The checks every fused LM-head function makes on hidden [N, d], weight [V, d], chunk_size and
    chunk_bytes (one ValueError naming the argument); returns (N, d, V)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    (n, d), v = hidden.shape, weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight.shape[1] ({weight.shape[1]}) must equal hidden.shape[1] ({d}): hidden is "
                         f"[N, d] = {tuple(hidden.shape)}, weight is [V, d] = {tuple(weight.shape)}")
    if v == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype ({weight.dtype}) must equal hidden dtype ({hidden.dtype})")
    for name, value in (("chunk_size", chunk_size), ("chunk_bytes", chunk_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if chunk_size is not None and chunk_bytes is not None:
        raise ValueError(f"give chunk_size (rows, {chunk_size}) or chunk_bytes (a logits budget, {chunk_bytes}), "
                         "not both")
    return n, d, v
