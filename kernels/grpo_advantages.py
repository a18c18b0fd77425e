"""Group-relative advantages (GRPO, Shao et al., 2024, arXiv:2402.03300; TRL 1.16 `_generate_and_score_completions`).

rewards [B*G]: G completions per prompt, groups contiguous. With mu_b, sd_b the mean and unbiased std of group b
(`torch.std`'s default), sd_batch the unbiased std of every reward of the step:
    A_i = (r_i - mu_b) / (sd_b + eps)          scale="group"  (GRPO)
    A_i = (r_i - mu_b) / (sd_batch + eps)      scale="batch"  (TRL scale_rewards="batch")
    A_i =  r_i - mu_b                          scale="none"   (Dr. GRPO, Liu et al., 2025, arXiv:2503.20783)
As in TRL, NaN rewards (unscorable completions) are left out of the means and stds (nanmean / nanstd) and get
advantage 0. Departures from TRL, all at degenerate groups: a group whose (non-NaN) rewards are all equal gets
advantage exactly 0 and mean exactly that reward (TRL's float mean can leave ~1e-5 of noise); the std of fewer
than two rewards is 0 (torch.std: NaN), so a group of one gets advantage 0.

The batch std of a step whose rewards are spread over ranks: each rank takes `reward_sums(rewards)` (count, sum
and sum of squares of its non-NaN rewards, float64 on the rewards' device), the trainer all-reduces that [3]
tensor once, and passes it as `batch_sums=`; sd_batch is then formed from the sums in float64 on the device (no
host sync) and the kernel reads it. Without `batch_sums` the kernel computes sd_batch of this call's rewards
itself, in two passes (mean, then squared deviations: no sum-of-squares cancellation).

One Triton program walks the whole batch in tiles of groups (any group size): rollout batches hold at most ~1e5
rewards (microseconds for one SM), and a single program makes the batch std a plain loop instead of a
cross-program reduction.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.dispatch import all_interpreted, check_float_dtype, launching, use_triton
from kernels.grpo_inputs import check_finite, compute_dtype

SCALES = ("group", "batch", "none")
# Rewards per tile (a power of two). Untuned: no GPU has run this kernel yet.
_ADVANTAGE_TILE = 4096


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _batch_std(rewards_ptr, n, BLOCK: tl.constexpr):
    """Unbiased std of the non-NaN rewards[0:n] (0 for fewer than two) in two passes over the batch: the mean,
    then squared deviations (no E[x^2] - E[x]^2 cancellation)."""
    total = 0.0
    count = 0.0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        r = tl.load(rewards_ptr + offs, mask=offs < n, other=float("nan")).to(tl.float32)
        total += tl.sum(tl.where(r == r, r, 0.0), axis=0)
        count += tl.sum((r == r).to(tl.float32), axis=0)
    mean = total / tl.maximum(count, 1.0)
    m2 = 0.0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        r = tl.load(rewards_ptr + offs, mask=offs < n, other=float("nan")).to(tl.float32)
        dev = tl.where(r == r, r - mean, 0.0)
        m2 += tl.sum(dev * dev, axis=0)
    return tl.where(count > 1.0, tl.sqrt(m2 / tl.maximum(count - 1.0, 1.0)), 0.0)


@triton.jit
def _group_advantages_kernel(
    # Pointers
    rewards_ptr,  # [n_groups * group_size], fp16 / bf16 / fp32
    batch_std_ptr,  # [] fp32: sd_batch from the step's sums (read when BATCH_STD_GIVEN)
    adv_ptr,  # [n_groups * group_size] fp32 out
    mean_ptr,  # [n_groups] fp32 out
    std_ptr,  # [n_groups] fp32 out
    zero_var_ptr,  # [n_groups] int8 out
    # Sizes (n_rewards = n_groups * group_size, computed on the host: an int argument equal to 1 is a
    # compile-time constant in Triton, with no .to())
    n_rewards,
    n_groups,
    group_size,
    # Scalars
    eps,
    # Compile-time switches: SCALE 0 = group std, 1 = batch std, 2 = none
    SCALE: tl.constexpr,
    BATCH_STD_GIVEN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One program walks the whole batch in [BLOCK_B groups, BLOCK_G rewards] tiles; NaN rewards are skipped
    (nanmean / nanstd)."""
    batch_std = 0.0
    if SCALE == 1:
        if BATCH_STD_GIVEN:
            batch_std = tl.load(batch_std_ptr)
        else:
            batch_std = _batch_std(rewards_ptr, n_rewards, BLOCK_B * BLOCK_G)

    for b0 in range(0, n_groups, BLOCK_B):
        groups = b0 + tl.arange(0, BLOCK_B)
        group_ok = groups < n_groups
        base = groups.to(tl.int64) * group_size
        # 1. Sum and count of each group's non-NaN rewards.
        total = tl.zeros([BLOCK_B], dtype=tl.float32)
        count = tl.zeros([BLOCK_B], dtype=tl.float32)
        for g0 in range(0, group_size, BLOCK_G):
            cols = g0 + tl.arange(0, BLOCK_G)
            ok = group_ok[:, None] & (cols < group_size)[None, :]
            r = tl.load(rewards_ptr + base[:, None] + cols[None, :], mask=ok, other=float("nan")).to(tl.float32)
            total += tl.sum(tl.where(r == r, r, 0.0), axis=1)
            count += tl.sum((r == r).to(tl.float32), axis=1)
        mean = total / tl.maximum(count, 1.0)
        # 2. Squared deviations, min and max (an all-equal group is exactly recognised, not via std ~ 0).
        m2 = tl.zeros([BLOCK_B], dtype=tl.float32)
        lo = tl.full([BLOCK_B], float("inf"), dtype=tl.float32)
        hi = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        for g0 in range(0, group_size, BLOCK_G):
            cols = g0 + tl.arange(0, BLOCK_G)
            ok = group_ok[:, None] & (cols < group_size)[None, :]
            r = tl.load(rewards_ptr + base[:, None] + cols[None, :], mask=ok, other=float("nan")).to(tl.float32)
            valid = r == r
            dev = tl.where(valid, r - mean[:, None], 0.0)
            m2 += tl.sum(dev * dev, axis=1)
            lo = tl.minimum(lo, tl.min(tl.where(valid, r, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(valid, r, float("-inf")), axis=1))
        zero_var = hi <= lo  # all equal, one reward, or none
        mean = tl.where(zero_var, tl.where(count > 0.0, lo, 0.0), mean)
        std = tl.where(zero_var | (count < 2.0), 0.0, tl.sqrt(m2 / tl.maximum(count - 1.0, 1.0)))
        if SCALE == 0:
            denom = std + eps
        elif SCALE == 1:
            denom = tl.zeros([BLOCK_B], dtype=tl.float32) + (batch_std + eps)
        else:
            denom = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        # 3. Advantages: 0 for NaN rewards and all-equal groups.
        for g0 in range(0, group_size, BLOCK_G):
            cols = g0 + tl.arange(0, BLOCK_G)
            ok = group_ok[:, None] & (cols < group_size)[None, :]
            ptrs = base[:, None] + cols[None, :]
            r = tl.load(rewards_ptr + ptrs, mask=ok, other=float("nan")).to(tl.float32)
            adv = (r - mean[:, None]) / denom[:, None]
            adv = tl.where((r == r) & (~zero_var[:, None]), adv, 0.0)
            tl.store(adv_ptr + ptrs, adv, mask=ok)
        tl.store(mean_ptr + groups, mean, mask=group_ok)
        tl.store(std_ptr + groups, std, mask=group_ok)
        tl.store(zero_var_ptr + groups, zero_var.to(tl.int8), mask=group_ok)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference (the definition, and the CPU path)
# ----------------------------------------------------------------------------------------------------


class GroupAdvantages(NamedTuple):
    """`group_advantages`' result; advantages [B*G], the rest [B] (one per group); fp32 (float64 for float64
    rewards) except the flags."""

    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    zero_variance: torch.Tensor


def reward_sums(rewards: torch.Tensor) -> torch.Tensor:
    """[3] float64 on rewards' device: count, sum and sum of squares of the non-NaN rewards (no host sync).
    Sum it over ranks (one all-reduce) and pass it to `group_advantages(..., scale="batch", batch_sums=...)`."""
    r = rewards.detach()
    valid = ~torch.isnan(r)
    r64 = torch.where(valid, r.double(), 0.0)
    return torch.stack([valid.sum().double(), r64.sum(), r64.square().sum()])


def std_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """The unbiased std of the rewards behind `reward_sums` (summed over ranks): 0-d float64, 0 for fewer than
    two rewards. float64 keeps ss - s^2 / n from cancelling at the scales of rewards."""
    n, s, ss = sums.detach().double().unbind(0)
    var = ((ss - s * s / n.clamp(min=1)) / (n - 1).clamp(min=1)).clamp(min=0)
    return torch.where(n > 1, var.sqrt(), 0.0)


def group_advantages_reference(rewards, group_size, *, scale="group", eps=1e-4, batch_sums=None):
    """The definition in PyTorch (also the CPU path); same arguments and result as `group_advantages`, in float64
    for float64 rewards."""
    n_groups = _check_advantage_inputs(rewards, group_size, scale, eps, batch_sums, triton=False)
    dtype = compute_dtype(rewards)
    r = rewards.detach().to(dtype).view(n_groups, group_size)
    valid = ~torch.isnan(r)
    count = valid.sum(1).to(dtype)
    mean = torch.where(valid, r, 0.0).sum(1) / count.clamp(min=1)
    lo = torch.where(valid, r, math.inf).amin(1)
    hi = torch.where(valid, r, -math.inf).amax(1)
    zero_var = hi <= lo
    mean = torch.where(zero_var, torch.where(count > 0, lo, 0.0), mean)
    m2 = torch.where(valid, r - mean[:, None], 0.0).square().sum(1)
    std = torch.where(zero_var | (count < 2), 0.0, (m2 / (count - 1).clamp(min=1)).sqrt())
    if scale == "group":
        denom = std + eps
    elif scale == "batch":
        if batch_sums is not None:
            batch_std = std_from_sums(batch_sums).to(dtype)
        else:
            flat = r[valid]
            batch_std = flat.std() if flat.numel() > 1 else r.new_zeros(())
        denom = (batch_std + eps).expand(n_groups)
    else:
        denom = torch.ones_like(std)
    adv = torch.where(valid & ~zero_var[:, None], (r - mean[:, None]) / denom[:, None], 0.0)
    return GroupAdvantages(adv.reshape(-1), mean, std, zero_var)


# ----------------------------------------------------------------------------------------------------
# Checks and launcher
# ----------------------------------------------------------------------------------------------------


def _check_advantage_inputs(rewards, group_size, scale, eps, batch_sums, triton):
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    check_finite("eps", eps, low=0.0)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B * G], got shape {tuple(getattr(rewards, 'shape', ()))}")
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be floating point, got {rewards.dtype}")
    check_float_dtype("group_advantages", "rewards", rewards, triton)
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards has {rewards.shape[0]} entries, not a multiple of group_size = {group_size} "
                         "(groups of G completions, contiguous)")
    if batch_sums is not None:
        if scale != "batch":
            raise ValueError(f"batch_sums is the batch std's input: it needs scale='batch', got scale={scale!r}")
        if not (isinstance(batch_sums, torch.Tensor) and batch_sums.shape == (3,)
                and batch_sums.dtype.is_floating_point):
            raise ValueError("batch_sums must be reward_sums(rewards) summed over ranks: a floating tensor [3] "
                             f"(count, sum, sum of squares), got {getattr(batch_sums, 'shape', batch_sums)}")
        if batch_sums.device != rewards.device:
            raise ValueError(f"batch_sums must be on the rewards' device ({rewards.device}), got {batch_sums.device}")
    return rewards.shape[0] // group_size


def _launch_group_advantages(rewards, group_size, n_groups, scale, eps, batch_sums):
    r = rewards.detach().contiguous()
    out = GroupAdvantages(
        torch.empty(r.shape[0], dtype=torch.float32, device=r.device),
        *(torch.empty(n_groups, dtype=torch.float32, device=r.device) for _ in range(2)),
        torch.empty(n_groups, dtype=torch.int8, device=r.device),
    )
    if n_groups:
        given = scale == "batch" and batch_sums is not None
        batch_std = std_from_sums(batch_sums).float() if given else out.mean  # never read when not given
        block_g = min(triton.next_power_of_2(group_size), _ADVANTAGE_TILE)
        block_b = max(1, min(triton.next_power_of_2(n_groups), _ADVANTAGE_TILE // block_g))
        if launching():  # not inside the memory planner's simulation (kernels.dispatch)
            _group_advantages_kernel[(1,)](
                r, batch_std, *out, r.shape[0], n_groups, group_size, float(eps),
                SCALE=SCALES.index(scale), BATCH_STD_GIVEN=given, BLOCK_B=block_b, BLOCK_G=block_g,
            )
    return out._replace(zero_variance=out.zero_variance.bool())


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


# Interpreted or compiled is fixed at import (kernels.dispatch): this module's kernel and tl.max / tl.sum.
KERNELS_INTERPRETED = all_interpreted(_group_advantages_kernel)


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    return use_triton(backend, device, KERNELS_INTERPRETED, "kernels.grpo_advantages", dtype)


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4, batch_sums=None,
                     backend="auto") -> GroupAdvantages:
    """Group-relative advantages of G completions per prompt (module docstring), in one Triton kernel.

    Args:
        rewards: [B * G] float, the G rewards of each prompt contiguous; NaN = unscorable (advantage 0, left
            out of the statistics).
        group_size: G >= 1 (G = 1 gives advantages 0).
        scale: "group" (divide by the group's std + eps), "batch" (by the whole step's std + eps, TRL's
            scale_rewards="batch"), "none" (Dr. GRPO: no division).
        eps: added to the std before dividing (TRL: 1e-4).
        batch_sums: scale="batch" only: `reward_sums` of every rank's rewards, summed over ranks ([3], on the
            rewards' device); None: the std of this call's rewards.
        backend: "auto" | "triton" | "reference".

    Dtypes: the policy of every kernel function (the `kernels` package docstring) for rewards, read into fp32;
    batch_sums are statistics (float32 or float64 on both paths): the std is formed from them in float64.

    Returns GroupAdvantages(advantages [B*G], mean [B], std [B] (unbiased; 0 for fewer than two rewards), all
    fp32 (float64 for float64 rewards), zero_variance [B] bool (all non-NaN rewards of the group equal: no
    learning signal)). No gradient; no host sync. Raises ValueError for a bad shape, dtype, group_size, scale,
    eps or batch_sums.
    """
    triton_path = _use_triton(backend, rewards.device, rewards.dtype) if isinstance(rewards, torch.Tensor) else False
    n_groups = _check_advantage_inputs(rewards, group_size, scale, eps, batch_sums, triton_path)
    if not triton_path:
        return group_advantages_reference(rewards, group_size, scale=scale, eps=eps, batch_sums=batch_sums)
    return _launch_group_advantages(rewards, group_size, n_groups, scale, eps, batch_sums)
