"""Cross-entropy for LM heads: fused with the linear layer (never the full [N, V] logits) or on given logits.

Math (per row i with label y_i != ignore_index; x_i = hidden_i @ weight.T + bias is the raw logit row [V]):

    t_i    = tanh(x_i / softcap)                              (only when softcap is set)
    z_i    = (softcap * t_i  or  x_i) / temperature           the logits the loss sees
    lse_i  = logsumexp(z_i)
    ce_i   = (1 - eps) * (lse_i - z_i[y_i]) + eps * (lse_i - mean_v z_i[v])      eps = label_smoothing
    zl_i   = z_loss_scale * lse_i^2                           (PaLM's z-loss)
    loss_i = ce_i + zl_i                                      ignored rows: loss_i = zl_i = 0
    d loss_i / d z_i = (1 + 2 * z_loss_scale * lse_i) * softmax(z_i) - eps / V - (1 - eps) * onehot(y_i)
    d z_i / d x_i    = (1 - t_i^2) / temperature              (1 / temperature without softcap)
    d hidden_i = dx_i @ weight,   d weight = sum_i dx_i^T hidden_i,   d bias = sum_i dx_i

Label smoothing is PyTorch's (`F.cross_entropy(label_smoothing=eps)`) and Liger-Kernel's; the z-loss is
Liger's `lse_square_scale` term, included in the loss and also returned on its own when asked (for logging:
it carries no gradient of its own). Softcap is Gemma 2's final-logit soft-capping, applied before the
temperature (the sampling temperature divides the model's logits). Reductions: "sum", "mean" (sum over the
non-ignored rows / their number; an all-ignored batch gives 0 and zero gradients, not NaN) and "none".

Shapes and dtypes:
    hidden [N, d], weight [V, d], bias [V] or None: one floating dtype (fp16 / bf16 / fp32), one device.
    logits [N, V] (for `cross_entropy`): fp16 / bf16 / fp32, last dimension contiguous (else copied).
    labels [N], any integer dtype; entries in [0, V) or equal to ignore_index.
    Losses are fp32 (log-sum-exp, softmax and the loss in fp32 whatever the input dtype); gradients come
    back in the dtype of the tensor they belong to. float64 inputs run on the reference path only, where
    everything (losses included) is float64; the Triton path refuses them (kernels/dispatch.py's policy).

FLOPs (fused): logits 2NdV + d hidden 2NdV + d weight 2NdV = 6NdV; reduction "none" with gradients
recomputes the logits in backward (8NdV). The elementwise work is O(NV) and memory-bound.

Memory (why this exists). Full logits cost N * V * b bytes (b = 2 for bf16, 4 for fp32), and eager autograd
keeps more buffers of that size (an fp32 copy, log-softmax, its gradient). A 16k-token micro-batch on a
152k vocabulary (Qwen2) is 16384 * 151936 * 2 B = 4.6 GiB in bf16 per buffer. Both fused paths hold one
chunk of rows at a time:
    Triton path:  chunk * V * b bytes of logits, overwritten in place with their gradient; default chunk:
                  the rows fitting 512 MiB, rounded down to a multiple of 128 (1,664 rows at V = 152k bf16).
    PyTorch path: chunk * V * 4 bytes of fp32 logits (twice at peak: logsumexp's temporary; default chunk:
                  rows fitting 64 MiB), plus an fp32 copy of a 16-bit weight (V * d * 4 bytes).
    Both: fp32 accumulators for d weight and d bias: V * d * 4 bytes (2.3 GiB at V = 152k, d = 4096; for a
          16-bit weight that is V * d * 2 more than its gradient), the price of fp32 accumulation across
          chunks. They live until backward, which scales them by grad_output and rounds them once.
The chunk trades memory for speed: each chunk reads and writes the fp32 d-weight accumulator (8 * V * d
bytes) against 2 * chunk * d * V FLOPs of its d-weight matmul, so chunks much below ~1k rows leave that
matmul memory-bound on an H100. The kernel itself moves 3 * chunk * V * b bytes per chunk (two reads, one
write), against the chunk's 6 * chunk * d * V matmul FLOPs.

How the Triton path works (Liger-Kernel's design, with the options moved into one kernel):
    per chunk of rows: logits = hidden_chunk @ weight.T in the input dtype (cuBLAS, fp32 accumulation);
    `_cross_entropy_kernel` (one program per row) makes an online log-sum-exp pass over the vocabulary, then
    a second pass that writes grad_scale * d loss / d x over the logits in place (bias, softcap,
    temperature, smoothing and z-loss inside the kernel, all fp32); then d hidden_chunk = dlogits @ weight
    and d weight += dlogits^T @ hidden_chunk (fp32 accumulator), d bias += column sums.
    Logits are rounded once to the input dtype, as in HF eager and Liger; the PyTorch path keeps them in
    fp32. A Cut-Cross-Entropy-style kernel (logits only in SRAM) was not chosen: without its gradient
    filtering it recomputes the logits in backward (8NdV FLOPs instead of 6NdV) and scatters d weight
    with atomics, while this path runs all three matmuls on cuBLAS.

Gradient schedule (both fused paths):
    reduction "sum" / "mean": the loss is a scalar, so d hidden / d weight / d bias are computed in the
        forward, chunk by chunk, while the chunk's logits are live; backward only multiplies by the
        incoming scalar grad_output. This is the trick of Liger-Kernel's fused linear cross-entropy.
    reduction "none": grad_output is a vector known only in backward, so the forward saves the inputs
        and the backward recomputes each chunk's logits (one chunk live at a time again).

Backends (`backend=`):
    "triton":    the Triton path. CPU tensors need TRITON_INTERPRET=1 set before triton and this module are
                 imported (Triton picks the interpreter when it decorates a function, its own included).
    "reference": the PyTorch path: chunked for `fused_linear_cross_entropy`, `cross_entropy_reference` for
                 `cross_entropy`.
    "auto":      the backend rule (kernels/dispatch.py): Triton for CUDA tensors, or for CPU tensors when
                 TRITON_INTERPRET=1, the PyTorch path otherwise.

References: Liger-Kernel (Hsu et al., 2024, arXiv:2410.10989); Cut Your Losses in Large-Vocabulary Language
Models (Wijmans et al., 2024, arXiv:2411.09009); online softmax (Milakov & Gimelshein, 2018); z-loss (PaLM,
Chowdhery et al., 2022); label smoothing (Szegedy et al., 2016).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.chunking import (
    MAX_BLOCK_V, accumulate_chunk_grads, check_lm_head, logits_buffer, row_tile, weight_grad_accumulator,
)
from kernels.chunking import default_chunk_size as _default_chunk_size
from kernels.dispatch import all_interpreted, check_float_dtype, launching, use_triton, values_readable

_REDUCTIONS = ("mean", "sum", "none")
# The row kernel's largest vocabulary tile (kernels.chunking.row_tile picks the tile from V under this cap).
_MAX_BLOCK_V = MAX_BLOCK_V
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# exp(x) = exp2(x * log2 e): exp2 / log2 are the hardware instructions.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------
# Triton kernel: one program per row, two passes over the vocabulary
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    # 2 / (1 + e^(-2u)) - 1 saturates to +-1 (never NaN) when e^(-2u) over- or underflows; libdevice's
    # tanh would not run in the interpreter. Near 0 it is a difference of two numbers near 1, accurate to one
    # fp32 unit absolutely but not relatively (4.7e-5 relative at u = 1e-3, found by the fuzzer); below
    # |u| = 1/8 the odd series u - u^3/3 + 2u^5/15 - 17u^7/315 takes over (next term 62u^9/2835 < 2e-10 there).
    u2 = u * u
    series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    wide = 2.0 / (1.0 + tl.exp2(u * (-2.0 * _LOG2E))) - 1.0
    return tl.where(tl.abs(u) < 0.125, series, wide)


@triton.jit
def _row_logsumexp(
    row_ptr, bias_ptr, n_cols, softcap, scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Online pass over one row of final logits in log2 units, z2 = z * log2 e (scale = log2 e / T).

    Returns (m2, log2 s, sum of z2): the running max, log2 of sum 2^(z2 - m2), and (for label smoothing,
    else 0) the sum of all z2.
    """
    m2 = float("-inf")
    s = 0.0
    z2_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < n_cols
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        z2 = tl.where(mask, x * scale, float("-inf"))
        m2_new = tl.maximum(m2, tl.max(z2, axis=0))
        s = s * tl.exp2(m2 - m2_new) + tl.sum(tl.exp2(z2 - m2_new), axis=0)
        m2 = m2_new
        if HAS_SMOOTHING:
            z2_sum += tl.sum(tl.where(mask, z2, 0.0), axis=0)
    return m2, tl.log2(s), z2_sum


@triton.jit
def _row_write_dlogits(
    row_ptr, bias_ptr, label, n_cols, m2, log2_s, row_coef, z_coef, uniform, target, softcap, scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Second pass: overwrite the row with row_coef * (chain rule) * d loss / d z, computed in fp32 and
    rounded once. softmax - onehot comes first, then the z-loss term z_coef * softmax: at the target,
    softmax - 1 cancels as softmax -> 1, and folding the -1 in after the z-loss factor (or after rounding)
    would lose the small remainder.
    """
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < n_cols
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            x = softcap * t
        p = tl.exp2((x * scale - m2) - log2_s)
        grad = (p - uniform - tl.where(offs == label, target, 0.0)) + z_coef * p
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        tl.store(row_ptr + offs, (grad * row_coef).to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_kernel(
    # Pointers
    logits_ptr,  # [n_rows, n_cols], any float dtype; overwritten with the scaled dlogits when WRITE_GRAD
    bias_ptr,  # [n_cols], added to every row (read only when HAS_BIAS)
    labels_ptr,  # [n_rows] int64
    loss_ptr,  # [n_rows] fp32 out: ce + z-loss per row, 0 at ignored rows
    z_loss_ptr,  # [n_rows] fp32 out: z-loss per row
    grad_scale_ptr,  # fp32 d total / d loss_row: [n_rows] (stride 1) or one value (stride 0)
    # Sizes and strides
    n_cols,
    logits_row_stride,
    grad_scale_stride,
    # Scalars
    ignore_index,
    label_smoothing,
    z_loss_scale,
    softcap,
    inv_temperature,
    # Compile-time switches
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # int64: row * row_stride passes 2^31 for N * V > 2 G elements (16k rows at V = 152k).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(z_loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
                tl.store(row_ptr + offs, zeros, mask=offs < n_cols)
        return

    # Everything runs in log2 units (z2 = z * log2 e) so that exp2 / log2 map to hardware instructions.
    scale = inv_temperature * _LOG2E
    # 1. The target's logit (one scalar load, transformed like the tiles), then the online log-sum-exp.
    x_target = tl.load(row_ptr + label).to(tl.float32)
    if HAS_BIAS:
        x_target += tl.load(bias_ptr + label).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * _tanh(x_target / softcap)
    m2, log2_s, z2_sum = _row_logsumexp(
        row_ptr, bias_ptr, n_cols, softcap, scale, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, BLOCK_V
    )
    lse = (m2 + log2_s) * _LN2

    # 2. Loss: smoothed cross-entropy plus z-loss, as log_s - (z_y - m) like log_softmax: exact-ish when the
    #    target is the max, where lse - z_y would cancel (and exactly 0 for V = 1).
    ce = (log2_s - (x_target * scale - m2)) * _LN2
    if HAS_SMOOTHING:
        ce = (1.0 - label_smoothing) * ce + label_smoothing * (log2_s - (z2_sum / n_cols - m2)) * _LN2
    z_loss = z_loss_scale * lse * lse
    tl.store(loss_ptr + row, ce + z_loss)
    tl.store(z_loss_ptr + row, z_loss)

    # 3. dlogits = grad_scale * d loss / d x, over the logits in place.
    if WRITE_GRAD:
        row_coef = tl.load(grad_scale_ptr + row * grad_scale_stride) * inv_temperature
        _row_write_dlogits(
            row_ptr, bias_ptr, label, n_cols, m2, log2_s, row_coef, 2.0 * z_loss_scale * lse,
            label_smoothing / n_cols, 1.0 - label_smoothing, softcap, scale, HAS_BIAS, HAS_SOFTCAP, BLOCK_V,
        )


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: the definition, on full fp32 logits through autograd (the spec for every path)
# ----------------------------------------------------------------------------------------------------


class CrossEntropyOutput(NamedTuple):
    """What `return_z_loss=True` returns: unpacks as (loss, z_loss); z_loss is already part of loss."""

    loss: torch.Tensor
    z_loss: torch.Tensor


@dataclass(frozen=True)
class _LossOptions:
    ignore_index: int
    label_smoothing: float
    z_loss_scale: float
    softcap: float | None
    temperature: float


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The reference path computes in fp32, or in float64 for float64 inputs (kernels/dispatch.py's policy)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reference_row_losses(logits32, labels, opts):
    """fp32 (or float64) [N, V] raw logits -> (loss_i, z-loss_i) [N] by the module docstring's formulas, via
    autograd."""
    z = logits32
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    z = z / opts.temperature
    labels = labels.long()
    ce = F.cross_entropy(
        z, labels, ignore_index=opts.ignore_index, reduction="none", label_smoothing=opts.label_smoothing
    )
    z_loss = opts.z_loss_scale * torch.logsumexp(z, dim=1).square() * (labels != opts.ignore_index)
    return ce + z_loss, z_loss


def _reduce(losses, z_losses, labels, opts, reduction, return_z_loss):
    if reduction == "sum":
        losses, z_losses = losses.sum(), z_losses.sum()
    elif reduction == "mean":
        n_valid = (labels != opts.ignore_index).sum().clamp(min=1)
        losses, z_losses = losses.sum() / n_valid, z_losses.sum() / n_valid
    return CrossEntropyOutput(losses, z_losses) if return_z_loss else losses


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_z_loss: bool = False,
):
    """The definition on full fp32 logits [N, V] (float64 for float64 logits); same arguments and result as
    `cross_entropy`."""
    opts = _check_options(ignore_index, label_smoothing, z_loss_scale, softcap, temperature, reduction)
    _check_logits(logits, labels, opts)
    check_float_dtype("cross_entropy_reference", "logits", logits, triton=False)
    losses, z_losses = _reference_row_losses(logits.to(_compute_dtype(logits)), labels, opts)
    return _reduce(losses, z_losses, labels, opts, reduction, return_z_loss)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_z_loss: bool = False,
):
    """Unchunked definition: `cross_entropy_reference` on the full fp32 [N, V] logits hidden @ weight.T + bias.

    Same arguments and result as `fused_linear_cross_entropy`; memory is N * V * 4 bytes (several times
    over with autograd).
    """
    opts = _check_options(ignore_index, label_smoothing, z_loss_scale, softcap, temperature, reduction)
    _check_inputs(hidden, weight, labels, bias, None, None, opts)
    check_float_dtype("linear_cross_entropy_reference", "hidden", hidden, triton=False)
    compute = _compute_dtype(hidden)
    logits = hidden.to(compute) @ weight.to(compute).T
    if bias is not None:
        logits = logits + bias.to(compute)
    losses, z_losses = _reference_row_losses(logits, labels, opts)
    return _reduce(losses, z_losses, labels, opts, reduction, return_z_loss)


# ----------------------------------------------------------------------------------------------------
# Input checks (shared by every path)
# ----------------------------------------------------------------------------------------------------


def _check_options(ignore_index, label_smoothing, z_loss_scale, softcap, temperature, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if not (z_loss_scale >= 0.0 and math.isfinite(z_loss_scale)):
        raise ValueError(f"z_loss_scale must be a finite number >= 0, got {z_loss_scale!r}")
    if softcap is not None and not (softcap > 0.0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return _LossOptions(
        ignore_index, float(label_smoothing), float(z_loss_scale), None if softcap is None else float(softcap),
        float(temperature),
    )


def _check_labels(labels, n, v, ignore_index):
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be 1-D with N = {n} entries (one per row), got shape {tuple(labels.shape)}")
    if labels.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"labels must have an integer dtype (int64 preferred), got {labels.dtype}")
    # Checked on CPU tensors only, where reading the flag waits for no device: on an accelerator it would be a
    # host sync on every SFT micro-batch. There an out-of-range label is not detected here: the reference path's
    # cross_entropy raises a device-side assert, the Triton kernel reads a logit outside the row.
    if n > 0 and labels.device.type == "cpu" and values_readable():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels must lie in [0, V) = [0, {v}) or equal ignore_index ({ignore_index}); "
                f"labels[{i}] = {int(labels[i])}"
            )


def _check_logits(logits, labels, opts):
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class (V >= 1)")
    if labels.device != logits.device:
        raise ValueError(f"logits and labels must be on one device, got {logits.device} and {labels.device}")
    _check_labels(labels, logits.shape[0], logits.shape[1], opts.ignore_index)


def _check_inputs(hidden, weight, labels, bias, chunk_size, chunk_bytes, opts):
    n, _, v = check_lm_head(hidden, weight, chunk_size, chunk_bytes)
    if bias is not None:
        if bias.shape != (v,):
            raise ValueError(f"bias must have shape [V] = ({v},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype ({bias.dtype}) must equal hidden dtype ({hidden.dtype})")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")
    _check_labels(labels, n, v, opts.ignore_index)


# ----------------------------------------------------------------------------------------------------
# One chunk of rows: the PyTorch step and the Triton launcher
# ----------------------------------------------------------------------------------------------------


def _torch_chunk_step(logits, labels, valid, opts, grad_scale):
    """PyTorch twin of `_cross_entropy_kernel` on one chunk of fp32 raw logits [c, V] (overwritten).

    Returns fp32 (loss [c], z-loss [c], dlogits [c, V] or None); dlogits = grad_scale * d loss / d x,
    with grad_scale 0-d or [c]; ignored rows get 0 everywhere.
    """
    # Options at their defaults cost no pass over [c, V].
    v, eps = logits.shape[1], opts.label_smoothing
    t = None
    if opts.softcap is not None:
        t = torch.tanh(logits.div_(opts.softcap))
        z = torch.mul(t, opts.softcap / opts.temperature, out=logits)
    else:
        z = logits if opts.temperature == 1.0 else logits.div_(opts.temperature)
    # Shifted by the row max m, as log_softmax does: with log_s = log sum exp(z - m), the loss is
    # log_s - (z_y - m), exact-ish when the target is the max, where lse - z_y would cancel.
    m = z.amax(dim=1)
    shifted = z.sub_(m.unsqueeze(1))
    log_s = torch.exp(shifted).sum(dim=1).log()
    lse = m + log_s
    safe = labels.masked_fill(~valid, 0).unsqueeze(1)
    shifted_target = shifted.gather(1, safe).squeeze(1)
    ce = log_s - shifted_target
    if eps:
        ce = (1 - eps) * ce + eps * (log_s - shifted.mean(dim=1))
    z_loss = opts.z_loss_scale * lse.square() * valid
    losses = ce * valid + z_loss
    if grad_scale is None:
        return losses, z_loss, None
    # softmax * (1 + 2 s lse) - eps / V - (1 - eps) onehot, row-scaled, then the chain rule, all in place.
    # The target entry is written from its own softmax, as (p - (1 - eps)) + 2 s lse p - eps / V: folding
    # the -1 in after the z-loss factor would cancel as p -> 1.
    z_coef = 2 * opts.z_loss_scale * lse
    grad = shifted.sub_(log_s.unsqueeze(1)).exp_()
    p_target = (shifted_target - log_s).exp()
    if opts.z_loss_scale:
        grad.mul_((1 + z_coef).unsqueeze(1))
    if eps:
        grad.sub_(eps / v)
    grad.scatter_(1, safe, ((p_target - (1 - eps)) + z_coef * p_target - eps / v).unsqueeze(1))
    grad.mul_((grad_scale * valid).unsqueeze(1))
    if t is not None:
        grad.mul_(t.square_().neg_().add_(1))
    return losses, z_loss, grad if opts.temperature == 1.0 else grad.div_(opts.temperature)


def _launch_cross_entropy(logits, labels, bias, opts, grad_scale):
    """Run `_cross_entropy_kernel` over the rows of `logits`; returns fp32 (loss [n], z-loss [n]).

    logits [n, V] with contiguous rows (any float dtype); labels [n] int64; bias [V] or None; grad_scale
    None (loss only, logits untouched) or fp32, 0-d or [n]: then logits are overwritten with
    grad_scale * d loss / d logits.
    """
    n, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits rows must be contiguous, got strides {logits.stride()}")
    if labels.dtype != torch.int64 or labels.shape != (n,) or labels.stride(0) != 1:
        raise ValueError(f"labels must be contiguous int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if bias is not None and (bias.shape != (v,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous [{v}], got shape {tuple(bias.shape)}")
    if grad_scale is not None and (grad_scale.dtype != torch.float32 or grad_scale.shape not in ((), (n,))):
        raise ValueError(f"grad_scale must be fp32 of shape () or ({n},), got {grad_scale.dtype} {grad_scale.shape}")
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    z_losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return losses, z_losses
    block_v, num_warps = row_tile(v, _MAX_BLOCK_V)
    if launching():  # not inside the memory planner's simulation (kernels.dispatch)
        _cross_entropy_kernel[(n,)](
            logits, logits if bias is None else bias, labels, losses, z_losses,
            losses if grad_scale is None else grad_scale,
            v, logits.stride(0), 0 if grad_scale is None or grad_scale.dim() == 0 else grad_scale.stride(0),
            opts.ignore_index, opts.label_smoothing, opts.z_loss_scale,
            1.0 if opts.softcap is None else opts.softcap, 1.0 / opts.temperature,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_SMOOTHING=opts.label_smoothing > 0,
            WRITE_GRAD=grad_scale is not None,
            BLOCK_V=block_v, num_warps=num_warps,
        )
    return losses, z_losses


# ----------------------------------------------------------------------------------------------------
# The chunk loop (both fused paths) and its gradient accumulation
# ----------------------------------------------------------------------------------------------------


def _fp32_accumulator(param, needed):
    """fp32 bias-gradient accumulator (float64 for a float64 parameter, on the reference path)."""
    return torch.zeros(param.shape, dtype=_compute_dtype(param), device=param.device) if needed else None


def _accumulate_grads(dlogits, h, weight, rows, grad_hidden, grad_weight32, grad_bias32):
    """Turn one chunk's dlogits [c, V] into its rows of d hidden and its share of d weight / d bias (fp32)."""
    accumulate_chunk_grads(dlogits, h, weight, rows, grad_hidden, grad_weight32)
    if grad_bias32 is not None:
        grad_bias32 += dlogits.sum(0, dtype=grad_bias32.dtype)


def _chunked_linear_cross_entropy(hidden, weight, bias, labels, opts, chunk, grad_scale, need, use_triton):
    """Per-row losses and z-losses, one chunk of logits at a time, and the gradients when asked.

    grad_scale: None (no gradients) or fp32 d total / d loss_i, 0-d or [N]. need: which of (hidden, weight,
    bias) get a gradient. Returns (loss [N], z-loss [N], d hidden, d weight, d bias): d hidden in hidden's
    dtype, d weight / d bias in fp32 (the caller rounds them once, after any last scaling), or None.
    """
    n, v = hidden.shape[0], weight.shape[0]
    valid = labels != opts.ignore_index
    # Triton: logits in the input dtype (one reused buffer); PyTorch: fp32 logits from an fp32 weight copy.
    compute = _compute_dtype(hidden)
    if use_triton:
        w, b = weight, None if bias is None else bias.contiguous()
    else:
        w, b = weight.to(compute), None if bias is None else bias.to(compute)
    logits_buf = logits_buffer(hidden, min(chunk, n), v) if use_triton else None
    need_h, need_w, need_b = need if grad_scale is not None else (False, False, False)
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight32 = weight_grad_accumulator(weight, _compute_dtype(weight), n) if need_w else None
    grad_bias32 = _fp32_accumulator(bias, need_b)
    losses = torch.empty(n, dtype=compute, device=hidden.device)
    z_losses = torch.empty_like(losses)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        scale = grad_scale if grad_scale is None or grad_scale.dim() == 0 else grad_scale[rows]
        if use_triton:
            logits = torch.mm(hidden[rows], w.T, out=logits_buf[: rows.stop - start])
            losses[rows], z_losses[rows] = _launch_cross_entropy(logits, labels[rows], b, opts, scale)
        else:
            logits = hidden[rows].to(compute) @ w.T
            if b is not None:
                logits += b
            losses[rows], z_losses[rows], logits = _torch_chunk_step(logits, labels[rows], valid[rows], opts, scale)
        if grad_scale is not None:
            _accumulate_grads(logits, hidden[rows], w, rows, grad_hidden, grad_weight32, grad_bias32)
    return losses, z_losses, grad_hidden, grad_weight32, grad_bias32


# ----------------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Fused linear cross-entropy (both paths); returns (loss, z-loss); see the module docstring's schedule."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts, reduction, chunk, needs_grad, use_triton):
        labels = labels.long().contiguous()
        n_valid = (labels != opts.ignore_index).sum().clamp(min=1)
        # "mean" divides by the number of valid labels (a tensor: no host sync); all-ignored gives 0.
        ones = hidden.new_ones((), dtype=_compute_dtype(hidden))
        scale = (1.0 / n_valid).to(ones.dtype) if reduction == "mean" else ones
        early_grads = reduction != "none" and any(needs_grad)
        # fp16 dlogits cannot carry the mean's 1/N: softmax / N for N = 16k rows falls below fp16's smallest
        # normal (6e-5) for most of a large vocabulary, and flushes to 0 below 6e-8. The chunk loop then works
        # on the gradient of the sum, and 1/N joins grad_output in backward, applied in fp32 and rounded once.
        # (bf16 has fp32's exponent range and takes 1/N in the kernel.)
        ctx.pending_scale = scale if reduction == "mean" and hidden.dtype == torch.float16 else None
        kernel_scale = ones if ctx.pending_scale is not None else scale
        ctx.opts, ctx.reduction, ctx.chunk, ctx.use_triton = opts, reduction, chunk, use_triton
        ctx.hidden_dtype, ctx.param_dtype = hidden.dtype, weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            losses, z_losses, *grads = _chunked_linear_cross_entropy(
                hidden, weight, bias, labels, opts, chunk, kernel_scale if early_grads else None, needs_grad,
                use_triton,
            )
        if early_grads:
            ctx.save_for_backward(*grads)
        elif any(needs_grad):
            ctx.save_for_backward(hidden, weight, bias, labels)
        if reduction == "none":
            ctx.mark_non_differentiable(z_losses)
            return losses, z_losses
        z_loss = z_losses.sum() * scale
        ctx.mark_non_differentiable(z_loss)
        return losses.sum() * scale, z_loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_z_loss):
        dtypes = (ctx.hidden_dtype, ctx.param_dtype, ctx.param_dtype)
        if ctx.reduction != "none":
            # Gradients were computed in the forward; scale by the incoming scalar. d weight / d bias are
            # still fp32: multiplied in fp32 and rounded once, straight into a tensor of their dtype.
            if ctx.pending_scale is None:
                return (
                    *(None if g is None else torch.mul(g, grad_loss, out=torch.empty_like(g, dtype=dtype))
                      for g, dtype in zip(ctx.saved_tensors, dtypes)),
                    None, None, None, None, None, None,
                )  # fmt: skip
            # fp16 "mean": d hidden holds the sum's gradient in fp16 (normal range); scaled in fp32, rounded once.
            factor = grad_loss.float() * ctx.pending_scale
            return (
                *(None if g is None else (g.float() * factor).to(dtype) for g, dtype in zip(ctx.saved_tensors, dtypes)),
                None, None, None, None, None, None,
            )  # fmt: skip
        hidden, weight, bias, labels = ctx.saved_tensors
        row_scale = grad_loss.to(_compute_dtype(hidden)).contiguous()
        # fp16 "none": the per-row factor is whatever the caller's graph gives, typically 1/N from a later
        # mean, and the same underflow as "mean" follows if the kernel stores g_i * dlogits in fp16. The kernel
        # takes g_i / max|g| instead (at most 1: the dlogits stay in fp16's normal range unless the rows' factors
        # span more than ~2^14), and max|g| multiplies the summed gradients in fp32, rounded once; a tensor
        # all along, so no host sync.
        factor = row_scale.abs().amax().clamp(min=torch.finfo(torch.float32).tiny) if (
            hidden.dtype == torch.float16 and row_scale.numel()) else None
        with torch.autocast(hidden.device.type, enabled=False):
            _, _, *grads = _chunked_linear_cross_entropy(
                hidden, weight, bias, labels, ctx.opts, ctx.chunk,
                row_scale if factor is None else row_scale / factor, ctx.needs_input_grad[:3], ctx.use_triton,
            )
        grads = (None if g is None else (g if factor is None else g.float() * factor).to(dtype)
                 for g, dtype in zip(grads, dtypes))
        return (*grads, None, None, None, None, None, None)


class _TritonCrossEntropy(torch.autograd.Function):
    """Cross-entropy on given logits; the gradient is written over the logits' storage in the forward."""

    @staticmethod
    def forward(ctx, logits, labels, opts, reduction, write_grad):
        labels = labels.long().contiguous()
        buffer = logits.detach()
        if buffer.stride(1) != 1:
            buffer = buffer.contiguous()
        n_valid = (labels != opts.ignore_index).sum().clamp(min=1)
        scale = (1.0 / n_valid).float() if reduction == "mean" else logits.new_ones((), dtype=torch.float32)
        losses, z_losses = _launch_cross_entropy(buffer, labels, None, opts, scale if write_grad else None)
        if write_grad:
            if buffer.data_ptr() == logits.data_ptr():
                # Any other node that saved these logits now fails loudly in backward instead of
                # reading the gradient as if it were the logits.
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(buffer)
        ctx.reduction, ctx.backward_done = reduction, False
        if reduction != "none":
            losses, z_losses = losses.sum() * scale, z_losses.sum() * scale
        ctx.mark_non_differentiable(z_losses)
        return losses, z_losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_z_loss):
        if ctx.backward_done:
            raise RuntimeError(
                "cross_entropy (Triton path): the gradient lives in the logits' storage and was already "
                "handed out; backward through this graph runs once (retain_graph is not supported)"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_loss.unsqueeze(1))
        elif grad_loss.item() != 1.0:  # a host sync that usually saves a full pass over [N, V]
            grad.mul_(grad_loss)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public functions (Liger's module and functional surface: kernels/liger_compat.py)
# ----------------------------------------------------------------------------------------------------


# Interpreted or compiled is fixed at import (kernels.dispatch): this module's kernels and tl.max / tl.sum.
_KERNELS_INTERPRETED = all_interpreted(_cross_entropy_kernel)


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    return use_triton(backend, device, _KERNELS_INTERPRETED, "kernels.cross_entropy", dtype)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_z_loss: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
):
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, without materialising the logits.

    Dtypes: the policy of every kernel function (the `kernels` package docstring).

    Args:
        hidden: [N, d] final hidden states (fp16 / bf16 / fp32; float64 on the reference path).
        weight: [V, d] LM-head weight, same dtype as hidden (tied embeddings: pass the embedding matrix).
        labels: [N] integer class ids in [0, V), or ignore_index.
        bias: [V] or None.
        ignore_index: label value whose rows contribute no loss and no gradient.
        reduction: "mean" (sum / number of non-ignored labels; 0.0 with zero gradients when every label
            is ignored), "sum", or "none" ([N] per-row losses, 0 at ignored rows).
        label_smoothing: eps in [0, 1]; PyTorch's / Liger's definition (module docstring).
        z_loss_scale: weight of the z-loss lse^2 (Liger's `lse_square_scale`); added to the loss.
        softcap: None, or c > 0 for logits c * tanh(x / c) (Gemma 2).
        temperature: T > 0; the loss sees (soft-capped) logits / T.
        return_z_loss: also return the z-loss term (reduced like the loss; no gradient of its own).
        chunk_size: rows per chunk; default: as many rows as keep one chunk's logits under 512 MiB
            (Triton path, input dtype, multiple of 128 rows) or 64 MiB (PyTorch path, fp32).
        backend: "auto" | "triton" | "reference" (see the module docstring).
        chunk_bytes: that logits budget instead of the default (not with chunk_size): more rows per chunk
            mean fewer passes over the fp32 d weight accumulator (kernels/chunking.py) and more memory.

    Returns:
        the fp32 loss (a scalar for "mean" / "sum", [N] for "none"), or `CrossEntropyOutput(loss, z_loss)`
        when return_z_loss. Gradients flow to hidden, weight and bias (those that require grad) in their
        own dtype, accumulated in fp32.

    Raises ValueError naming the argument for shape / dtype / device mismatches, non-integer labels,
    labels outside [0, V) other than ignore_index (checked on CPU tensors only: no host sync on an
    accelerator), a bad option, chunk_size or chunk_bytes;
    RuntimeError for backend="triton" on CPU tensors without the Triton interpreter.
    """
    opts = _check_options(ignore_index, label_smoothing, z_loss_scale, softcap, temperature, reduction)
    _check_inputs(hidden, weight, labels, bias, chunk_size, chunk_bytes, opts)
    use_triton = _use_triton(backend, hidden.device, hidden.dtype)
    check_float_dtype("fused_linear_cross_entropy", "hidden", hidden, use_triton)
    n, v = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or _default_chunk_size(n, v, use_triton, hidden.element_size(), chunk_bytes)
    needs_grad = (
        torch.is_grad_enabled() and hidden.requires_grad,
        torch.is_grad_enabled() and weight.requires_grad,
        torch.is_grad_enabled() and bias is not None and bias.requires_grad,
    )
    loss, z_loss = _LinearCrossEntropy.apply(
        hidden, weight, bias, labels, opts, reduction, chunk, needs_grad, use_triton
    )
    return CrossEntropyOutput(loss, z_loss) if return_z_loss else loss


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_z_loss: bool = False,
    backend: str = "auto",
):
    """Cross-entropy on given logits [N, V] (the non-fused kernel), same options and result as above.

    Dtypes: the policy of every kernel function (the `kernels` package docstring).

    On the Triton path, when the logits require grad, the forward overwrites the logits' storage with
    their gradient (no second [N, V] buffer, as in Liger): do not read the logits after this call. Their
    version counter is bumped, so an autograd node that saved them (e.g. a preceding tanh) raises in
    backward instead of computing garbage; backward runs once. Logits whose last dimension is not
    contiguous are copied first (and left intact). The PyTorch path (`cross_entropy_reference`) never
    writes to its input.
    """
    opts = _check_options(ignore_index, label_smoothing, z_loss_scale, softcap, temperature, reduction)
    _check_logits(logits, labels, opts)
    if not _use_triton(backend, logits.device, logits.dtype):
        check_float_dtype("cross_entropy", "logits", logits, triton=False)
        losses, z_losses = _reference_row_losses(logits.to(_compute_dtype(logits)), labels, opts)
        # The z-loss comes back without a gradient of its own on every path (it is already inside the loss).
        return _reduce(losses, z_losses.detach(), labels, opts, reduction, return_z_loss)
    check_float_dtype("cross_entropy", "logits", logits, triton=True)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, z_loss = _TritonCrossEntropy.apply(logits, labels, opts, reduction, write_grad)
    return CrossEntropyOutput(loss, z_loss) if return_z_loss else loss
