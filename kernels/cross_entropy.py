"""Linear cross-entropy that never builds the [N, V] logits.

Math (per token i with label y_i != ignore_index):

    z_i    = hidden_i @ weight.T + bias                  [V]
    loss_i = logsumexp(z_i) - z_i[y_i]                   (= -log softmax(z_i)[y_i])
    dz_i   = softmax(z_i) - onehot(y_i)                  (times the reduction scale)
    d hidden_i = dz_i @ weight,  d weight = sum_i dz_i^T hidden_i,  d bias = sum_i dz_i

Shapes and dtypes:
    hidden [N, d], weight [V, d], bias [V] or None: one floating dtype (fp32 / fp16 / bf16), one device.
    labels [N], any integer dtype; entries in [0, V) or equal to ignore_index.
    Logits, log-sum-exp and all accumulation are fp32 whatever the input dtype; the loss is returned in
    fp32; gradients come back in the dtype of the tensor they belong to.

Memory (why this exists). Full fp32 logits cost N * V * 4 bytes, and autograd keeps a second buffer
of that size for their gradient. A 16k-token micro-batch on a 152k vocabulary (Qwen2) is
16384 * 151936 * 4 B = 9.3 GiB per buffer. The chunked path holds one chunk of rows at a time:
chunk * V * 4 bytes (about 64 MiB by default, ~110 rows at V = 152k), in the forward and in the
backward. For fp16/bf16 inputs it also holds an fp32 copy of the weight and an fp32 weight-gradient
accumulator (V * d * 4 bytes each), the price of fp32 accumulation on the PyTorch path; the Triton
kernel (a later issue) works tile by tile and needs neither.

How the gradients are scheduled:
    reduction "sum" / "mean": the loss is a scalar, so d hidden / d weight / d bias are computed in the
        forward, chunk by chunk, while the chunk's logits are live; backward only multiplies by the
        incoming scalar grad_output. This is the trick of Liger-Kernel's fused linear cross-entropy.
    reduction "none": grad_output is a vector known only in backward, so the forward saves the inputs
        and the backward recomputes each chunk's logits (one chunk live at a time again).

Backends (`backend=`):
    "reference": the chunked PyTorch path below (the CPU path).
    "triton":    the fused Triton kernel. It lands in issue #3/#4; until then forcing it raises
                 NotImplementedError.
    "auto":      the rule of DESIGN.md: Triton for CUDA tensors, or for CPU tensors when
                 TRITON_INTERPRET=1, reference otherwise. Until the Triton kernel lands, "auto"
                 always takes the reference path.
"""

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "triton", "reference")
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# Default chunk: rows whose fp32 logits fit in this many bytes.
_CHUNK_LOGITS_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: the definition, on full fp32 logits (the spec the tests hold every path to)
# ----------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Unchunked definition: `F.cross_entropy` on the full fp32 [N, V] logits.

    Same arguments and result as `fused_linear_cross_entropy`; memory is N * V * 4 bytes (twice with
    autograd). "mean" divides by the number of non-ignored labels and gives 0.0 when there are none.
    """
    _check_inputs(hidden, weight, labels, bias, reduction, None, ignore_index)
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    losses = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# Input checks (shared by every path)
# ----------------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, bias, reduction, chunk_size, ignore_index=None):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    n, d = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"weight.shape[1] ({weight.shape[1]}) must equal hidden.shape[1] ({d}): "
            f"hidden is [N, d] = {tuple(hidden.shape)}, weight is [V, d] = {tuple(weight.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"labels must be 1-D with N = {n} entries (one per hidden row), got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"labels must have an integer dtype (int64 preferred), got {labels.dtype}")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype ({weight.dtype}) must equal hidden dtype ({hidden.dtype})")
    if bias is not None:
        if bias.shape != (v,):
            raise ValueError(f"bias must have shape [V] = ({v},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype ({bias.dtype}) must equal hidden dtype ({hidden.dtype})")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # One host sync: an out-of-range label would otherwise index garbage (or crash a kernel).
    if ignore_index is not None and n > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels must lie in [0, V) = [0, {v}) or equal ignore_index ({ignore_index}); "
                f"labels[{i}] = {int(labels[i])}"
            )


# ----------------------------------------------------------------------------------------------------
# Chunked PyTorch path (the CPU path; same memory shape as the Triton kernel)
# ----------------------------------------------------------------------------------------------------


def _default_chunk_size(n: int, v: int) -> int:
    return max(1, min(n, _CHUNK_LOGITS_BYTES // (4 * max(v, 1))))


def _chunk_loss_and_dlogits(h, weight32, bias32, labels, valid, row_scale):
    """One chunk of rows: per-row fp32 losses, and dlogits = row_scale * (softmax - onehot) [c, V] fp32.

    row_scale is None when no gradient is needed (only the losses are computed). Ignored rows have
    loss 0 and, through row_scale (zero there), dlogits 0.
    """
    # 1. fp32 logits of the chunk: the only [c, V] buffer; reused in place for the gradient.
    logits = h.float() @ weight32.T
    if bias32 is not None:
        logits += bias32
    # 2. loss = logsumexp - target logit (ignored rows read label 0 and are zeroed).
    safe = labels.masked_fill(~valid, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=1)
    losses = (lse - logits.gather(1, safe).squeeze(1)) * valid
    if row_scale is None:
        return losses, None
    # 3. softmax - onehot, scaled per row, in place.
    logits.sub_(lse.unsqueeze(1)).exp_()
    logits.scatter_add_(1, safe, -valid.float().unsqueeze(1))
    logits.mul_(row_scale.unsqueeze(1))
    return losses, logits


def _accumulate_grads(dlogits, h, weight32, rows, grad_hidden, grad_weight32, grad_bias32):
    """Turn one chunk's dlogits [c, V] into its rows of d hidden and its share of d weight / d bias."""
    if grad_hidden is not None:
        grad_hidden[rows] = (dlogits @ weight32).to(grad_hidden.dtype)
    if grad_weight32 is not None:
        grad_weight32.addmm_(dlogits.T, h.float())
    if grad_bias32 is not None:
        grad_bias32 += dlogits.sum(0)


def _fp32(t):
    return None if t is None else t.float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Chunked fused linear cross-entropy; see the module docstring for the gradient schedule."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_size, needs_grad):
        n = hidden.shape[0]
        weight32, bias32 = _fp32(weight), _fp32(bias)  # no copy for fp32 inputs
        labels = labels.long()
        valid = labels != ignore_index
        chunk = chunk_size or _default_chunk_size(n, weight.shape[0])
        ctx.reduction, ctx.ignore_index, ctx.chunk = reduction, ignore_index, chunk

        # "mean" divides by the number of valid labels (a tensor: no host sync); all-ignored gives 0.
        scale = 1.0 / valid.sum().clamp(min=1).float() if reduction == "mean" else None
        # Gradients in the forward only for the scalar reductions; "none" recomputes in backward.
        early_grads = reduction != "none" and any(needs_grad)
        need_h, need_w, need_b = needs_grad if early_grads else (False, False, False)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight32 = torch.zeros_like(weight32) if need_w else None
        grad_bias32 = torch.zeros_like(bias32) if need_b else None

        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            row_scale = None
            if early_grads:
                row_scale = valid[rows].float() if scale is None else valid[rows] * scale
            losses[rows], dlogits = _chunk_loss_and_dlogits(
                hidden[rows], weight32, bias32, labels[rows], valid[rows], row_scale
            )
            if early_grads:
                _accumulate_grads(dlogits, hidden[rows], weight32, rows, grad_hidden, grad_weight32, grad_bias32)

        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
            return losses
        grad_weight = None if grad_weight32 is None else grad_weight32.to(weight.dtype)
        grad_bias = None if grad_bias32 is None else grad_bias32.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        total = losses.sum()
        return total if scale is None else total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction != "none":
            # Gradients were computed in the forward; scale by the incoming scalar.
            return (*(None if g is None else g * grad_output for g in ctx.saved_tensors), None, None, None, None, None)

        hidden, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        weight32, bias32 = _fp32(weight), _fp32(bias)
        valid = labels != ctx.ignore_index
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight32 = torch.zeros_like(weight32) if need_w else None
        grad_bias32 = torch.zeros_like(bias32) if need_b else None
        for start in range(0, n, ctx.chunk):
            rows = slice(start, min(start + ctx.chunk, n))
            row_scale = grad_output[rows].float() * valid[rows]
            _, dlogits = _chunk_loss_and_dlogits(hidden[rows], weight32, bias32, labels[rows], valid[rows], row_scale)
            _accumulate_grads(dlogits, hidden[rows], weight32, rows, grad_hidden, grad_weight32, grad_bias32)
        grad_weight = None if grad_weight32 is None else grad_weight32.to(weight.dtype)
        grad_bias = None if grad_bias32 is None else grad_bias32.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def _select_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "fused_linear_cross_entropy: the Triton path lands in issue #3/#4; use backend='auto' or 'reference'"
        )
    # "auto" would pick Triton for CUDA tensors or TRITON_INTERPRET=1; no Triton kernel exists yet.
    return "reference"


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, without materialising the logits.

    Args:
        hidden: [N, d] final hidden states (fp32 / fp16 / bf16).
        weight: [V, d] LM-head weight, same dtype as hidden.
        labels: [N] integer class ids in [0, V), or ignore_index.
        bias: [V] or None.
        ignore_index: label value whose rows contribute no loss and no gradient.
        reduction: "mean" (sum / number of non-ignored labels; 0.0 with zero gradients when every label
            is ignored), "sum", or "none" ([N] per-row losses, 0 at ignored rows).
        chunk_size: rows per chunk on the PyTorch path; default: as many rows as keep one chunk's fp32
            logits under 64 MiB. Peak extra memory is chunk_size * V * 4 bytes instead of N * V * 4.
        backend: "auto" | "triton" | "reference" (see the module docstring). "triton" raises
            NotImplementedError until the Triton kernel lands (issue #3/#4); "auto" uses the reference.

    Returns:
        fp32 loss: a scalar for "mean" / "sum", [N] for "none", always fp32 (accumulated in fp32 even for
        fp16/bf16 inputs). Gradients flow to hidden, weight and bias (those that require grad) in their
        own dtype.

    Raises ValueError naming the argument for shape / dtype / device mismatches, non-integer labels,
    labels outside [0, V) other than ignore_index (checked with one host sync), a bad reduction or
    chunk_size.
    """
    _check_inputs(hidden, weight, labels, bias, reduction, chunk_size, ignore_index)
    _select_backend(backend)
    needs_grad = (
        torch.is_grad_enabled() and hidden.requires_grad,
        torch.is_grad_enabled() and weight.requires_grad,
        torch.is_grad_enabled() and bias is not None and bias.requires_grad,
    )
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, ignore_index, reduction, chunk_size, needs_grad
    )
