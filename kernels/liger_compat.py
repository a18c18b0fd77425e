"""Liger-Kernel 0.8.5's loss surfaces over fastmath's kernels: same names, argument order, defaults, return types.

    LigerFusedLinearCrossEntropyLoss, liger_fused_linear_cross_entropy, CrossEntropyOutput
        Liger's `liger_kernel.transformers` fused linear cross-entropy (module and functional form).
    LigerFusedLinearGRPOLoss
        Liger's `liger_kernel.chunked_loss` GRPO loss: batch x time inputs, `(loss, metrics)` back; a thin adapter
        that packs the batch and calls kernels.grpo_fused_loss.fused_linear_grpo_loss.

Every Liger option is either computed as Liger computes it, or refused with one ValueError naming it
(`LIGER_OPTIONS` lists which, and docs/kernels.md's compatibility table is generated from it). Where fastmath's answer
differs from Liger's on purpose, the docstrings say so (an all-ignored "mean" batch gives 0, not Liger's NaN;
gradients are accumulated in fp32 whatever `accum_dtype`).

Cross-entropy options that the kernel does not have, composed from its per-row outputs (math per row i with
label y_i != ignore_index, ce_i the smoothed cross-entropy without the z-loss, zl_i the z-loss, n the number of
non-ignored rows):
    ce_weight w (no label smoothing):  loss_i = w[y_i] ce_i + zl_i; "mean" divides the ce part by sum_i w[y_i]
                                       and the z-loss by n (Liger's; the z-loss is not class-weighted).
    ce_weight w with smoothing eps:    ce_i = (1 - eps) w[y_i] (lse_i - z_iy) + (eps / V) sum_v w_v (lse_i - z_iv),
                                       a class-weighted sum over the vocabulary the kernel does not have: computed
                                       by PyTorch on fp32 logits, one checkpointed chunk of rows at a time.
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
# the reason given), or "refused" (one ValueError naming it, the reason given). The docs/kernels.md table comes from here.
CE_OPTIONS = {
    "ce_weight": ("computed", "class weights; with label_smoothing > 0 on a chunked PyTorch path (checkpointed "
                              "chunks, the weight gradient accumulated in the weight's dtype)"),
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
        if label_smoothing:
            ce_part, z_part = _class_weighted_smoothing(input, weight, target, valid, ce_weight, label_smoothing,
                                                        lse_square_scale, common)
        else:
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


def _class_weighted_smoothing(input, weight, target, valid, ce_weight, label_smoothing, lse_square_scale, common):
    """Per-row (class-weighted smoothed cross-entropy, z-loss) by the module docstring's formula, in PyTorch on fp32
    logits, one checkpointed chunk of rows at a time (its logits recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    w, eps, v = ce_weight.detach().float(), label_smoothing, weight.shape[0]
    bias, softcap = common["bias"], common["softcap"]
    y = target.masked_fill(~valid, 0)

    def rows(h, lm_weight, b, y_rows, valid_rows):
        z = (h @ lm_weight.T).float()
        if b is not None:
            z = z + b.float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        lse = torch.logsumexp(z, dim=1)
        nll = lse - z.gather(1, y_rows[:, None]).squeeze(1)
        smooth = (w * (lse[:, None] - z)).sum(dim=1)
        ce = ((1 - eps) * w[y_rows] * nll + eps / v * smooth) * valid_rows
        return ce, lse_square_scale * lse.square() * valid_rows

    step = common["chunk_size"] or max(input.shape[0], 1)
    parts = [checkpoint(rows, input[i:i + step], weight, bias, y[i:i + step], valid[i:i + step], use_reentrant=False)
             for i in range(0, input.shape[0], step)]
    if not parts:
        empty = input.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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


# ----------------------------------------------------------------------------------------------------
# GRPO: Liger's LigerFusedLinearGRPOLoss over the packed fused loss
# ----------------------------------------------------------------------------------------------------

GRPO_OPTIONS = {
    "beta": ("computed", "k3 KL; with no reference log-probs and use_ref_model=False the KL is 0, as in Liger"),
    "compiled": ("accepted", "torch.compile of Liger's loss math; no effect on the result here"),
    "use_ref_model": ("computed", "reference log-probs from ref_input / ref_weight / ref_bias when not given"),
    "chunk_size": ("computed", "sequences per chunk -> chunk_size * T rows per chunk"),
    "epsilon_low": ("computed", ""),
    "epsilon_high": ("computed", "cispo: the ratio cap"),
    "loss_type": ("computed", "grpo, bnpo, dr_grpo, dapo, cispo, sapo; luspo at sequence level without KL or "
                              "vllm_is_ratio (elsewhere Liger's luspo weights unmasked tokens); vespo refused"),
    "max_completion_length": ("computed", "dr_grpo"),
    "importance_sampling_level": ("computed", "token, sequence"),
    "sapo_temperature_pos": ("computed", ""),
    "sapo_temperature_neg": ("computed", ""),
    "temperature": ("computed", ""),
    "delta": ("computed", "must exceed 1 + epsilon_high; refused otherwise"),
    "use_bias_correction_kl": ("computed", "token level; refused at sequence level"),
    "vespo_k_pos": ("refused", "vespo only (refused)"),
    "vespo_lambda_pos": ("refused", "vespo only (refused)"),
    "vespo_k_neg": ("refused", "vespo only (refused)"),
    "vespo_lambda_neg": ("refused", "vespo only (refused)"),
    "bias": ("computed", "forward argument: an extra input column of ones (copies hidden and weight)"),
    "ref_input / ref_weight / ref_bias": ("computed", "forward arguments"),
    "vllm_is_ratio": ("computed", "forward argument, [B, T], [B, 1] or [B]"),
    "num_items_in_batch": ("computed", "forward argument; divided by the world size, as Liger"),
}


def _with_bias_column(hidden, weight, bias):
    """hidden @ weight.T + bias as one matmul: [hidden, 1] @ [weight, bias].T (exact: the extra term is bias)."""
    if bias is None:
        return hidden, weight
    ones = hidden.new_ones(hidden.shape[0], 1)
    return torch.cat([hidden, ones], dim=1), torch.cat([weight, bias.to(weight.dtype)[:, None]], dim=1)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Liger's `LigerFusedLinearGRPOLoss` (liger_kernel.chunked_loss): the same constructor and forward, batch x
    time inputs, `(loss, metrics)` back, with metrics = (KL mean when beta != 0, clip fraction), both
    token-weighted over attention_mask as Liger's. A thin adapter: it flattens the batch (every position a token,
    attention_mask its mask, the row its sequence) and calls `fused_linear_grpo_loss` once.

    _input [B, T, d], lin_weight [V, d], selected_token_ids [B, T], attention_mask [B, T], advantages [B];
    ref_per_token_logps / old_per_token_logps [B, T]; ref_input [B, T, d] with ref_weight [V, d] (and ref_bias)
    give the reference log-probs when they are not passed (use_ref_model); vllm_is_ratio [B, T], [B, 1] or [B].
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ):
        super().__init__()
        if loss_type == "vespo":
            raise ValueError("loss_type='vespo' is not supported by fastmath's GRPO kernels")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size (sequences per chunk) must be a positive int, got {chunk_size!r}")
        if delta is not None and not delta > 0:
            raise ValueError(f"delta must be positive, got {delta}")
        # The remaining checks (ranges, delta > 1 + epsilon_high, ...) are the kernel's own, made at the first call.
        self.beta, self.compiled, self.use_ref_model, self.chunk_size = beta, compiled, use_ref_model, chunk_size
        self.epsilon_low, self.epsilon_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length, self.importance_sampling_level = max_completion_length, importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature, self.delta, self.use_bias_correction_kl = temperature, delta, use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        from kernels.grpo_fused_loss import fused_linear_grpo_loss
        from kernels.grpo_logprobs import fused_linear_logprobs

        if self.importance_sampling_level == "sequence" and self.loss_type in ("cispo", "sapo"):
            raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{self.loss_type}' "
                             "(Liger's rule, raised where Liger raises it: at the call)")
        if _input.dim() != 3:
            raise ValueError(f"_input must be [B, T, d], got shape {tuple(_input.shape)}")
        b, t, d = _input.shape
        for name, x in (("selected_token_ids", selected_token_ids), ("attention_mask", attention_mask)):
            if not isinstance(x, torch.Tensor) or x.shape != (b, t):
                raise ValueError(f"{name} must be [B, T] = ({b}, {t}), got {getattr(x, 'shape', x)}")
        if not isinstance(advantages, torch.Tensor) or advantages.shape != (b,):
            raise ValueError(f"advantages must be [B] = ({b},), got {getattr(advantages, 'shape', advantages)}")
        if self.loss_type == "luspo" and (self.importance_sampling_level != "sequence" or self.beta != 0.0
                                          or vllm_is_ratio is not None):
            raise ValueError("loss_type='luspo' is supported at importance_sampling_level='sequence' with beta = 0 "
                             "and no vllm_is_ratio only (Liger's luspo weights unmasked tokens otherwise)")
        hidden = _input.reshape(b * t, d)
        targets = selected_token_ids.reshape(b * t)
        flat = lambda x: None if x is None else x.reshape(b * t)  # noqa: E731
        ref = flat(ref_per_token_logps)
        if ref is None and self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_per_token_logps, or ref_input and ref_weight")
            with torch.no_grad():
                ref = fused_linear_logprobs(*_with_bias_column(ref_input.reshape(b * t, -1), ref_weight, ref_bias),
                                            targets, temperature=self.temperature)
        iw = None
        if vllm_is_ratio is not None:
            ratio = vllm_is_ratio if vllm_is_ratio.dim() == 2 else vllm_is_ratio.reshape(b, 1)
            if ratio.shape not in ((b, t), (b, 1)):
                raise ValueError(f"vllm_is_ratio must be [B, T], [B, 1] or [B], got {tuple(vllm_is_ratio.shape)}")
            iw = ratio.expand(b, t).reshape(b * t)
        world = _world_size()
        if num_items_in_batch is None and world > 1 and self.loss_type in ("dapo", "cispo"):
            num_items_in_batch = attention_mask.float().sum()
            torch.distributed.all_reduce(num_items_in_batch)  # Liger's normaliser: every rank's tokens
        if num_items_in_batch is not None:
            num_items_in_batch = num_items_in_batch / world
        # Without reference log-probs (use_ref_model=False) Liger's KL is against the policy itself: 0, no gradient.
        beta = self.beta if ref is not None else 0.0
        h, w = _with_bias_column(hidden, lin_weight, bias)
        loss, stats = fused_linear_grpo_loss(
            h, w, targets, flat(old_per_token_logps), advantages, torch.arange(b, device=_input.device)
            .repeat_interleave(t), mask=flat(attention_mask), ref_logprobs=ref, beta=beta,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items_in_batch,
            importance_weights=iw, temperature=self.temperature, chunk_size=self.chunk_size * t, delta=self.delta,
            use_bias_correction_kl=self.use_bias_correction_kl, sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
        )
        clip = (stats.low_clipped + stats.high_clipped) / stats.tokens.clamp(min=1)
        metrics = (clip,) if self.beta == 0.0 else (stats.kl_mean if ref is not None else clip.new_zeros(()), clip)
        return loss, metrics
