"""Liger-Kernel 0.8.5's loss surfaces over fastmath's kernels: same names, argument order, defaults, return types.

    LigerFusedLinearCrossEntropyLoss, liger_fused_linear_cross_entropy, CrossEntropyOutput
        Liger's `liger_kernel.transformers` fused linear cross-entropy (module and functional form).
    LigerFusedLinearGRPOLoss
        Liger's `liger_kernel.chunked_loss` GRPO loss: batch x time inputs, `(loss, metrics)` back; a thin adapter
        that packs the batch and calls kernels.grpo_fused_loss.fused_linear_grpo_loss.

Every Liger option is either computed as Liger computes it, or refused with one ValueError naming it
(`LIGER_OPTIONS` lists which, and the README's compatibility table is generated from it). Where fastmath's answer
differs from Liger's on purpose, the docstrings say so (an all-ignored "mean" batch gives 0, not Liger's NaN;
gradients are accumulated in fp32 whatever `accum_dtype`).

Cross-entropy options that the kernel does not have, composed from its per-row outputs (math per row i with
label y_i != ignore_index, ce_i the smoothed cross-entropy without the z-loss, zl_i the z-loss, n the number of
non-ignored rows):
    ce_weight w (no label smoothing):  loss_i = w[y_i] ce_i + zl_i; "mean" divides the ce part by sum_i w[y_i]
                                       and the z-loss by n (Liger's; the z-loss is not class-weighted).
    use_token_scaling:                 every row's loss (z-loss included) times s_i = softmax(z_i)[y_i], s_i held
                                       constant (detached), as Liger does.
    return_token_accuracy:             mean over non-ignored rows of [argmax_v z_iv == y_i] ("none": per row, 0 at
                                       ignored rows); argmax = first maximal index of the soft-capped logits.
    return_predicted_tokens:           argmax_v z_iv per row (int64), -1 at ignored rows.
Cost: ce_weight or use_token_scaling run the per-row ("none") path (the logits recomputed in backward) plus one
no-grad pass for s_i or for the unweighted z-loss; the argmax outputs one more no-grad matmul pass, one chunk of
logits at a time. Without these options the call is `fused_linear_cross_entropy` itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cross_entropy import fused_linear_cross_entropy

_ACCUM_DTYPES = (None, torch.float32)

# Option -> how fastmath treats it: "computed" (the same math as Liger), "accepted" (no effect on the result,
# the reason given), or "refused" (one ValueError naming it, the reason given). The README table comes from here.
CE_OPTIONS = {
    "ce_weight": ("computed", "class weights; refused together with label_smoothing > 0"),
    "ignore_index": ("computed", ""),
    "lse_square_scale": ("computed", "the z-loss"),
    "label_smoothing": ("computed", ""),
    "reduction": ("computed", '"mean", "sum", "none"; an all-ignored "mean" batch gives 0 (Liger: NaN)'),
    "softcap": ("computed", ""),
    "return_z_loss": ("computed", "z_loss in the input dtype, as Liger"),
    "accum_dtype": ("computed", "None or torch.float32: fastmath accumulates in fp32 either way; others refused"),
    "use_token_scaling": ("computed", ""),
    "return_token_accuracy": ("computed", ""),
    "return_predicted_tokens": ("computed", ""),
    "bias": ("computed", "forward argument"),
    "chunk_mem_const": ("computed", "functional form only: Liger's rows per chunk"),
}


@dataclass
class CrossEntropyOutput:
    """Liger's `liger_kernel.transformers.functional.CrossEntropyOutput`: fields left None when not asked for."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _liger_chunk_rows(n: int, d: int, v: int, chunk_mem_const) -> int | None:
    """Liger's rows per chunk: the next power of two of ceil(N / ceil(V / (C d))), at most N (logits of about
    C * N * d elements per chunk)."""
    if isinstance(chunk_mem_const, bool) or not isinstance(chunk_mem_const, int) or chunk_mem_const < 1:
        raise ValueError(f"chunk_mem_const must be a positive int, got {chunk_mem_const!r}")
    if n == 0:
        return None
    per = -(-v // (chunk_mem_const * d))
    rows = 1 << max(-(-n // per) - 1, 0).bit_length()
    return min(rows, n)


@torch.no_grad()
def _argmax_rows(hidden, weight, bias, softcap, chunk):
    """argmax_v of each row's (soft-capped) logits, one chunk of rows at a time; logits in the input dtype as on
    Liger's path, compared in fp32; ties to the first index."""
    out = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    step = chunk or max(hidden.shape[0], 1)
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        logits = hidden[rows] @ weight.T
        if bias is not None:
            logits = logits + bias
        logits = logits.float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        out[rows] = logits.argmax(dim=1)
    return out


def liger_fused_linear_cross_entropy(
    input,
    weight,
    target,
    bias=None,
    ce_weight=None,
    ignore_index: int = -100,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    return_z_loss: bool = False,
    accum_dtype=None,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    chunk_mem_const: int = 1,
):
    """Liger's `liger_fused_linear_cross_entropy` (same arguments, order and result) on fastmath's kernel.

    input [N, d], weight [V, d], target [N], bias [V] or None, ce_weight [V] or None (floating). Returns the loss,
    or `CrossEntropyOutput` when any of return_z_loss / return_token_accuracy / return_predicted_tokens is set.
    The module docstring has the math of the options the kernel does not have itself.
    """
    for name in ("return_z_loss", "use_token_scaling", "return_token_accuracy", "return_predicted_tokens"):
        _check_flag(name, locals()[name])
    if accum_dtype not in _ACCUM_DTYPES:
        raise ValueError(f"accum_dtype must be None or torch.float32 (fastmath accumulates in fp32), got {accum_dtype}")
    if ce_weight is not None:
        if not isinstance(ce_weight, torch.Tensor) or ce_weight.shape != (weight.shape[0],) or \
                not ce_weight.dtype.is_floating_point:
            raise ValueError(f"ce_weight must be a floating tensor of shape [V] = ({weight.shape[0]},), got "
                             f"{getattr(ce_weight, 'shape', ce_weight)}")
        if label_smoothing > 0:
            raise ValueError("ce_weight with label_smoothing > 0 is not supported (Liger's class-weighted smoothing "
                             "term); use one of the two")
    if input.dim() != 2:
        raise ValueError(f"input must be 2-D [N, d], got shape {tuple(input.shape)}")
    chunk = _liger_chunk_rows(input.shape[0], input.shape[1], weight.shape[0], chunk_mem_const)
    common = dict(bias=bias, ignore_index=ignore_index, softcap=softcap, chunk_size=chunk)
    valid = target != ignore_index
    n_valid = valid.sum().clamp(min=1)

    if ce_weight is None and not use_token_scaling:
        loss, z_loss = fused_linear_cross_entropy(
            input, weight, target, reduction=reduction, label_smoothing=label_smoothing,
            z_loss_scale=lse_square_scale, return_z_loss=True, **common,
        )
    else:
        loss, z_loss = _weighted_rows(input, weight, target, ce_weight, use_token_scaling, valid, n_valid, reduction,
                                      label_smoothing, lse_square_scale, common)

    token_accuracy = predicted = None
    if return_token_accuracy or return_predicted_tokens:
        predicted = _argmax_rows(input.detach(), weight.detach(), None if bias is None else bias.detach(), softcap,
                                 chunk).masked_fill_(~valid, -1)
        hits = ((predicted == target) & valid).float()
        token_accuracy = hits if reduction == "none" else hits.sum() / n_valid
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    return CrossEntropyOutput(
        loss=loss, z_loss=z_loss.to(input.dtype) if return_z_loss else None,
        token_accuracy=token_accuracy if return_token_accuracy else None,
        predicted_tokens=predicted if return_predicted_tokens else None,
    )


def _weighted_rows(input, weight, target, ce_weight, use_token_scaling, valid, n_valid, reduction, label_smoothing,
                   lse_square_scale, common):
    """(loss, z-loss) with class weights and / or token scaling, from the kernel's per-row losses."""
    rows = fused_linear_cross_entropy(input, weight, target, reduction="none", label_smoothing=label_smoothing,
                                      z_loss_scale=lse_square_scale, return_z_loss=True, **common)
    row_loss, row_z = rows.loss, rows.z_loss
    scale = torch.ones_like(row_loss)
    if use_token_scaling:  # s_i = p(y_i) = exp(-(plain cross-entropy)), held constant
        with torch.no_grad():
            plain = fused_linear_cross_entropy(input, weight, target, reduction="none", **common)
        scale = torch.exp(-plain) * valid
    ce_part, z_part = row_loss, torch.zeros_like(row_loss)
    if ce_weight is not None:
        w_y = ce_weight.detach().to(row_loss.dtype)[target.masked_fill(~valid, 0)] * valid
        if lse_square_scale:  # the z-loss unweighted: ce_i = loss_i - zl_i with zl_i's own gradient
            ce_part = fused_linear_cross_entropy(input, weight, target, reduction="none", **common)
            z_part = row_loss - ce_part
        ce_part = ce_part * w_y
    if reduction == "mean":
        ce_norm = (w_y.sum() if ce_weight is not None else n_valid.to(row_loss.dtype))
        ce_part = ce_part / torch.where(ce_norm == 0, torch.ones_like(ce_norm), ce_norm)
        z_part = z_part / n_valid
        row_z = row_z / n_valid
    loss = (ce_part + z_part) * scale
    z_loss = row_z * scale
    if reduction == "none":
        return loss, z_loss
    return loss.sum(), z_loss.sum()


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """Liger's `LigerFusedLinearCrossEntropyLoss`: the same constructor and `forward(lin_weight, _input, target,
    bias=None)`, computed by `liger_fused_linear_cross_entropy` (Liger's chunk rows, chunk_mem_const = 1)."""

    def __init__(
        self,
        ce_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        accum_dtype: torch.dtype | None = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
    ):
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
        if accum_dtype not in _ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be None or torch.float32 (fastmath accumulates in fp32), got "
                             f"{accum_dtype}")
        if ce_weight is not None and label_smoothing > 0:
            raise ValueError("ce_weight with label_smoothing > 0 is not supported (Liger's class-weighted smoothing "
                             "term); use one of the two")
        self.ce_weight, self.ignore_index, self.lse_square_scale = ce_weight, ignore_index, lse_square_scale
        self.label_smoothing, self.reduction, self.softcap = label_smoothing, reduction, softcap
        self.return_z_loss, self.accum_dtype, self.use_token_scaling = return_z_loss, accum_dtype, use_token_scaling
        self.return_token_accuracy, self.return_predicted_tokens = return_token_accuracy, return_predicted_tokens

    def forward(self, lin_weight, _input, target, bias=None):
        return liger_fused_linear_cross_entropy(
            _input, lin_weight, target, bias, self.ce_weight, self.ignore_index, self.lse_square_scale,
            self.label_smoothing, self.reduction, self.softcap, self.return_z_loss, self.accum_dtype,
            self.use_token_scaling, self.return_token_accuracy, self.return_predicted_tokens,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, lse_square_scale={self.lse_square_scale}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, softcap={self.softcap}")
