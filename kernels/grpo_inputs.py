"""The arguments of the GRPO kernel functions: the loss options and per-call tensors as two small frozen
records, and the checks every path shares (one ValueError naming the argument and the cause).

The public functions keep wide, drop-in signatures (TRL's and Liger's names); they check their arguments here
once and hand `LossOptions` and `LossInputs` to the internal paths.

Dtypes follow kernels/dispatch.py's policy: fp16, bf16 and fp32 on both paths with fp32 accumulation, float64
on the reference path only (computed in float64 end to end), refused at the boundary of the Triton path.

Host synchronisation: the value checks (ids in range, mask 0 / 1) read tensor values on the host, so they run
only when every checked tensor is on the CPU, where no device has to be waited for. On an accelerator they are
skipped (one sync per micro-batch and per no-grad pass otherwise): an out-of-range sequence id then fails in
`index_add_` (a device-side assert), an out-of-range target gives a NaN log-prob on the Triton path and a
device-side assert in `gather` on the reference path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.chunking import check_lm_head
from kernels.dispatch import check_float_dtype, values_readable

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
# The loss types whose per-token term is TRL's clipped surrogate -min(r A, clip(r) A) (the others: cispo, sapo).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LEVELS = ("token", "sequence")
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (the reference path's exact mode), fp32 otherwise (the accumulators)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of the GRPO loss, checked (`loss_options`)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    level: str = "token"  # importance_sampling_level
    max_completion_length: int | None = None
    temperature: float = 1.0
    delta: float | None = None  # two-sided clipping's upper bound on the ratio (INTELLECT-2)
    use_bias_correction_kl: bool = False  # the KL term times the ratio (DeepSeek-V3.2)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    entropy_coef: float = 0.0  # the entropy bonus: loss - entropy_coef * (masked token mean of the entropy)


@dataclass(frozen=True)
class LossInputs:
    """The tensors of one GRPO loss call besides the log-probs (or hidden states), as the caller gave them.

    num_items_in_batch / num_sequences: the step's global counts (None, a number or a one-element tensor)."""

    old_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    seq_ids: torch.Tensor
    mask: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    importance_weights: torch.Tensor | None = None
    num_items_in_batch: object = None
    num_sequences: object = None


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_finite(name, value, low=None, high=None):
    if not _is_number(value) or not math.isfinite(value) or (low is not None and value < low) or (
        high is not None and value > high
    ):
        bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")


def check_temperature(temperature):
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_count(name, value):
    """None, a positive number, or a one-element tensor (its value is not checked: reading it would sync)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be None, a number > 0 or a one-element tensor, got {value!r}")


def loss_options(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", importance_sampling_level="token",
                 max_completion_length=None, temperature=1.0, delta=None, use_bias_correction_kl=False,
                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, entropy_coef=0.0) -> LossOptions:
    """The checked `LossOptions` of the public arguments (ValueError naming the argument)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {LEVELS}, got {importance_sampling_level!r}")
    check_finite("beta", beta, low=0.0)
    check_finite("epsilon_low", epsilon_low, low=0.0, high=1.0)
    check_finite("epsilon_high", epsilon_high, low=0.0)
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):
        raise ValueError(f"max_completion_length must be None or a positive int, got {max_completion_length!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (its normaliser is S * L_max)")
    check_temperature(temperature)
    if delta is not None:  # TRL and Liger use it in the clipped loss types only (cispo / sapo: no effect)
        check_finite("delta", delta)
        if loss_type in CLIPPED_LOSS_TYPES and not delta > 1.0 + epsilon_high:
            raise ValueError(f"delta ({delta}) must exceed 1 + epsilon_high ({1.0 + epsilon_high}): a smaller upper "
                             "bound is not supported")
    if not isinstance(use_bias_correction_kl, bool):
        raise ValueError(f"use_bias_correction_kl must be True or False, got {use_bias_correction_kl!r}")
    if use_bias_correction_kl and importance_sampling_level == "sequence":
        raise ValueError("use_bias_correction_kl is supported at importance_sampling_level='token' only")
    check_finite("sapo_temperature_pos", sapo_temperature_pos)
    check_finite("sapo_temperature_neg", sapo_temperature_neg)
    if not (sapo_temperature_pos > 0 and sapo_temperature_neg > 0):
        raise ValueError(f"sapo_temperature_pos and sapo_temperature_neg must be > 0, got {sapo_temperature_pos}, "
                         f"{sapo_temperature_neg}")
    check_finite("entropy_coef", entropy_coef)
    return LossOptions(float(beta), float(epsilon_low), float(epsilon_high), loss_type, importance_sampling_level,
                       max_completion_length, float(temperature), None if delta is None else float(delta),
                       use_bias_correction_kl, float(sapo_temperature_pos), float(sapo_temperature_neg),
                       float(entropy_coef))


def check_float_input(function, name, t, triton):
    """A floating tensor within the dtype policy of the chosen path."""
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    check_float_dtype(function, name, t, triton)


def check_logprobs(function, t, name, triton):
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N] (packed tokens), got shape {tuple(t.shape)}")
    check_float_input(function, name, t, triton)


def check_loss_inputs(function, n, device, inputs: LossInputs, opts: LossOptions, triton: bool) -> list:
    """Shapes, dtypes and devices of the per-token / per-sequence tensors; returns the value checks (for
    `check_values`, together with the targets')."""
    old, adv, seq_ids, mask = inputs.old_logprobs, inputs.advantages, inputs.seq_ids, inputs.mask
    ref, iw = inputs.ref_logprobs, inputs.importance_weights
    if opts.beta != 0.0 and ref is None:
        raise ValueError(f"beta = {opts.beta} > 0 needs ref_logprobs (the reference policy's log-probs)")
    _check_count("num_items_in_batch", inputs.num_items_in_batch)
    _check_count("num_sequences", inputs.num_sequences)
    for name, t in (("old_logprobs", old), ("ref_logprobs", ref), ("importance_weights", iw)):
        if t is not None:
            check_logprobs(function, t, name, triton)
            if t.shape[0] != n:
                raise ValueError(f"{name} must have N = {n} entries (one per token), got {t.shape[0]}")
    if not isinstance(adv, torch.Tensor) or adv.dim() != 1 or not adv.dtype.is_floating_point:
        raise ValueError("advantages must be a 1-D floating tensor [S] (one per sequence), got "
                         f"{getattr(adv, 'shape', adv)} {getattr(adv, 'dtype', '')}")
    check_float_dtype(function, "advantages", adv, triton)
    if seq_ids.dim() != 1 or seq_ids.shape[0] != n:
        raise ValueError(f"seq_ids must be 1-D with N = {n} entries (one per token), got shape {tuple(seq_ids.shape)}")
    if seq_ids.dtype not in INTEGER_DTYPES:
        raise ValueError(f"seq_ids must have an integer dtype, got {seq_ids.dtype}")
    if mask is not None:
        if mask.dim() != 1 or mask.shape[0] != n:
            raise ValueError(f"mask must be 1-D with N = {n} entries (one per token), got shape {tuple(mask.shape)}")
        if mask.dtype.is_complex:
            raise ValueError(f"mask must be bool or hold 0 / 1, got {mask.dtype}")
    tensors = {"advantages": adv, "seq_ids": seq_ids, "old_logprobs": old, "ref_logprobs": ref,
               "importance_weights": iw, "mask": mask}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if any(d != device for d in devices.values()):
        raise ValueError(f"all tensors must be on the device of the log-probs ({device}), got "
                         + ", ".join(f"{k}: {v}" for k, v in devices.items()))
    n_seqs = adv.shape[0]
    checks = [("seq_ids", seq_ids, lambda: (seq_ids < 0) | (seq_ids >= n_seqs), f"must lie in [0, S) = [0, {n_seqs})")]
    if mask is not None and mask.dtype != torch.bool:
        checks.append(("mask", mask, lambda: (mask != 0) & (mask != 1), "must be bool or hold only 0 and 1"))
    return checks


def check_linear_inputs(function, hidden, weight, targets, chunk_size, triton, chunk_bytes=None) -> list:
    """Shapes, dtypes and devices of the LM-head inputs; returns the targets' value check."""
    n, _, v = check_lm_head(hidden, weight, chunk_size, chunk_bytes)
    check_float_dtype(function, "hidden", hidden, triton)
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be 1-D with N = {n} entries (one per row), got shape {tuple(targets.shape)}")
    if targets.dtype not in INTEGER_DTYPES:
        raise ValueError(f"targets must have an integer dtype, got {targets.dtype}")
    if len({hidden.device, weight.device, targets.device}) != 1:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    return [("targets", targets, lambda: (targets < 0) | (targets >= v), f"must lie in [0, V) = [0, {v})")]


def check_values(checks) -> None:
    """checks: (name, values [N], bad () -> [N] bool, what they must be). Run only when every tensor is on the
    CPU (module docstring: on an accelerator reading the flags would stall the host every micro-batch); then a
    ValueError naming the first failing argument and its first bad entry."""
    checks = [c for c in checks if c[1].numel()]
    if not values_readable() or any(values.device.type != "cpu" for _, values, _, _ in checks):
        return
    for name, values, bad, must in checks:
        flags = bad()
        if flags.any():
            i = int(flags.nonzero()[0, 0])
            raise ValueError(f"{name} {must}; {name}[{i}] = {values[i].item()}")
