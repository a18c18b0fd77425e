"""GRPO in kernels: group advantages, log-probs of the sampled tokens, and the clipped policy loss, fused
with the LM head (never the full [N, V] logits).

Batches are packed and padding-free: every per-token tensor is flat [N] (the completion tokens of all
sequences of the micro-batch, one after another); `seq_ids[N]` names each token's sequence in 0..S-1 (the
tokens of a sequence need not be contiguous); per-sequence tensors are [S].

1. Group advantages (GRPO, Shao et al., 2024, arXiv:2402.03300; TRL 1.16 `_generate_and_score_completions`).
   rewards [B*G]: G completions per prompt, groups contiguous. With mu_b, sd_b the mean and unbiased std of
   group b (`torch.std`'s default), sd_batch the unbiased std of the whole batch:
       A_i = (r_i - mu_b) / (sd_b + eps)          scale="group"  (GRPO)
       A_i = (r_i - mu_b) / (sd_batch + eps)      scale="batch"  (TRL scale_rewards="batch")
       A_i =  r_i - mu_b                          scale="none"   (Dr. GRPO, Liu et al., 2025, arXiv:2503.20783)
   As in TRL, NaN rewards (unscorable completions) are left out of the means and stds (nanmean / nanstd) and
   get advantage 0. Departures from TRL, all at degenerate groups: a group whose (non-NaN) rewards are all
   equal gets advantage exactly 0 and mean exactly that reward (TRL's float mean can leave ~1e-5 of noise);
   the std of fewer than two rewards is 0 (torch.std: NaN), so a group of one gets advantage 0. One Triton
   program walks the whole batch in tiles of groups (any group size), so the batch std needs no second kernel.

2. Log-probs of the sampled tokens (`fused_linear_logprobs`), per token t with x_t = hidden_t @ weight.T:
       z_t = x_t / T,  lse_t = logsumexp(z_t),  logp_t = z_t[y_t] - lse_t,  H_t = -sum_v p_tv log p_tv
       d logp_t / d x_t = (onehot(y_t) - softmax(z_t)) / T

3. The loss (TRL 1.16 `GRPOTrainer._compute_loss`, the forms of its loss types "grpo", "bnpo", "dr_grpo",
   "dapo"). With old_t the sampling policy's log-probs (None: on-policy, old = logp.detach()):
       token level (GRPO):      lr_t = logp_t - old_t
       sequence level (GSPO):   lr_t = lr_s = sum_{u in s} m_u (logp_u - old_u) / max(sum_{u in s} m_u, 1)
                                (Zheng et al., 2025, arXiv:2507.18071)
       r_t = exp(lr_t),  A_t = advantages[s(t)]
       pl_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) * w_t      (w_t: importance_weights, 1)
       kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                        (k3 estimator, Schulman 2020)
       l_t  = pl_t + beta * kl_t
       loss = sum_t m_t c_s(t) l_t, the normaliser c_s by loss type, with GLOBAL counts (S_g = num_sequences or
       the local S; D_g = num_items_in_batch or the local masked token count):
           "grpo":     c_s = 1 / (max(n_s, 1) * S_g)      n_s = masked tokens of sequence s (local: a sequence
                                                          lives in one micro-batch)
           "bnpo", "dapo": c_s = 1 / max(D_g, 1)
           "dr_grpo":  c_s = 1 / (S_g * max_completion_length)
   so the losses of the micro-batches (and ranks) of one step sum to the loss of the whole step (a trainer
   whose gradient reduction averages over ranks multiplies by the world size). Fully-masked sequences add 0.
   Gradient (clipping makes pl flat in r where TRL flags a token as clipped):
       g_t = d pl_t / d lr_t = 0 if (r_t < 1 - eps_low and A_t < 0) or (r_t > 1 + eps_high and A_t > 0)
                               else -A_t r_t w_t
       token level:     d loss / d logp_t = m_t c_s (g_t + beta (1 - exp(ref_t - logp_t)))
       sequence level:  d loss / d logp_u = m_u c_s (-A_s r_s wbar_s [unless clipped] + beta (1 - exp(ref_u - logp_u)))
                        wbar_s = sum_{t in s} m_t w_t / max(n_s, 1)
   Gradients flow to logprobs (or hidden and weight) only; old / ref log-probs, advantages and importance
   weights are constants. Log-ratios are not clamped before exp, as in TRL: r overflows fp32 only past
   log-ratio 88, a run that has diverged, and then the loss should read inf rather than a clamped number.
   Not supported (TRL options): the loss types "cispo", "sapo", "luspo", "vespo"; `delta`; the KL bias
   correction; top-entropy masking; the off-policy mask.

4. `fused_linear_grpo_loss`: 2 and 3 in one chunked pass. Once old log-probs, advantages and normalisers are
   known, d loss / d logp_t is a function of the token's own logp_t (token level), so each chunk of rows
   computes its logits (cuBLAS), the row log-sum-exp, entropy and logp (Triton, one program per row), the
   token terms (Triton), and overwrites the logits with d loss / d x_t = (d loss / d logp_t)(onehot - softmax)/T,
   then d hidden (rows) = dlogits @ weight and d weight += dlogits^T @ hidden (fp32 accumulator): the
   gradients exist when the forward returns; backward only multiplies by grad_output. Sequence level needs
   every token's logp before any ratio is known: pass 1 computes logp and the log-sum-exp of every row
   (no gradients), then the per-sequence ratios, then pass 2 recomputes the logits chunk by chunk and writes
   the gradients (one vocabulary pass per row instead of two: the log-sum-exp is kept from pass 1).

FLOPs: logits 2NdV, d hidden 2NdV, d weight 2NdV: 6NdV at token level, 8NdV at sequence level (logits twice).
`fused_linear_logprobs` is 2NdV forward and 6NdV backward (the logits recomputed: its grad_output is a vector
known only then). Elementwise work is O(NV) and memory-bound: the row kernels read each chunk's logits twice
and write them once (3 * chunk * V * b bytes, b = 2 for bf16), against 6 * chunk * d * V matmul FLOPs.

Memory (the reason this exists): full logits are N * V * b bytes (16k tokens at V = 152k: 4.6 GiB in bf16),
and eager autograd keeps several such buffers (an fp32 copy, the log-softmax, their gradients). Here:
    Triton path:  one chunk of logits, chunk * V * b bytes, overwritten by its gradient (default: rows that
                  fit 512 MiB, a multiple of 128: 1,664 rows at V = 152k bf16);
    PyTorch path: two chunk-sized fp32 buffers, reused across chunks: the logits (worked over in place) and
                  the softmax numerators, which become the gradient (default: rows that fit 64 MiB each), plus
                  an fp32 copy of a 16-bit weight (V * d * 4 bytes);
    both:         an fp32 accumulator for d weight (V * d * 4 bytes), plus O(N) fp32 per-token vectors
                  (log-probs, log-sum-exp, entropy, d loss / d logp, 5 stats terms) and O(S) per sequence.

Numerics: the row kernels run in log2 units (z2 = z log2 e, so exp2 / log2 are the hardware instructions), with
one fp32 online pass giving the max, sum and the entropy sum h = sum 2^(z2 - m) (z2 - m) <= 0 (rescaled like the
sum when the max moves; H = ln 2 (log2 s - h / s) has no cancellation against the max). Logits are rounded to
the input dtype once on the Triton path (as HF eager), kept in fp32 on the PyTorch path; all sums are fp32.
Per-sequence sums (sequence-level log-ratios, importance weights) use `index_add_`, whose fp32 adds are atomic
and in no fixed order on CUDA (not bitwise reproducible run to run at sequence level; token counts are exact).

Dispatch (`backend=`): "triton" (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton and
this module are imported), "reference" (PyTorch: the chunked path for the fused functions, the autograd
definition for `grpo_loss`, the torch twin for `group_advantages`), "auto" (DESIGN.md's rule: Triton for CUDA
tensors or when TRITON_INTERPRET=1, PyTorch otherwise). The definitions (`*_reference`) are the spec.

GPU speed and memory of the Triton path are still to be measured (bench/bench_grpo.py; so far CPU only).
"""

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.chunking import add_weight_grad
from kernels.chunking import default_chunk_size as _default_chunk_size
from kernels.dispatch import all_interpreted, use_triton

_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_LEVELS = ("token", "sequence")
_SCALES = ("group", "batch", "none")
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# Tiles (powers of two). Untuned: no GPU has run these kernels yet.
_MAX_BLOCK_V = 8192
_TOKEN_BLOCK = 1024
_ADVANTAGE_TILE = 4096
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# The per-token terms buffer [5, N] holds, by row: 0 the loss term m c l, then what GRPOStats sums:
# 1 low-clipped, 2 high-clipped, 3 KL, 4 ratio (each times the mask).


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _group_advantages_kernel(
    # Pointers
    rewards_ptr,  # [n_groups * group_size], any float dtype
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
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One program walks the whole batch in [BLOCK_B groups, BLOCK_G rewards] tiles. Rollout batches hold at
    most ~1e5 rewards (microseconds for one SM), and a single program makes the batch std a plain loop
    instead of a cross-program reduction. NaN rewards are skipped (nanmean / nanstd)."""
    n = n_rewards
    batch_std = 0.0
    if SCALE == 1:
        # Two passes over the batch: mean, then squared deviations (no E[x^2] - E[x]^2 cancellation). Names of
        # their own: a name bound here and rebound in the group loops below (there with another type or shape)
        # would be a loop-carried value of changing type, which the compiler rejects (the interpreter does not).
        batch_total = 0.0
        batch_count = 0.0
        for start in range(0, n, BLOCK_B * BLOCK_G):
            batch_offs = start + tl.arange(0, BLOCK_B * BLOCK_G)
            batch_r = tl.load(rewards_ptr + batch_offs, mask=batch_offs < n, other=float("nan")).to(tl.float32)
            batch_total += tl.sum(tl.where(batch_r == batch_r, batch_r, 0.0), axis=0)
            batch_count += tl.sum((batch_r == batch_r).to(tl.float32), axis=0)
        batch_mean = batch_total / tl.maximum(batch_count, 1.0)
        batch_m2 = 0.0
        for start in range(0, n, BLOCK_B * BLOCK_G):
            batch_offs = start + tl.arange(0, BLOCK_B * BLOCK_G)
            batch_r = tl.load(rewards_ptr + batch_offs, mask=batch_offs < n, other=float("nan")).to(tl.float32)
            batch_dev = tl.where(batch_r == batch_r, batch_r - batch_mean, 0.0)
            batch_m2 += tl.sum(batch_dev * batch_dev, axis=0)
        batch_std = tl.where(batch_count > 1.0, tl.sqrt(batch_m2 / tl.maximum(batch_count - 1.0, 1.0)), 0.0)

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


@triton.jit
def _grpo_token_kernel(
    # Pointers, per token [n_tokens]
    logp_ptr,  # current log-probs, any float dtype
    old_ptr,  # old log-probs (read when HAS_OLD and not SEQ_LEVEL)
    ref_ptr,  # reference log-probs (read when HAS_REF)
    iw_ptr,  # importance weights (read when HAS_IW)
    mask_ptr,  # fp32 0 / 1
    seq_ptr,  # int64 sequence ids
    # Pointers, per sequence [S], fp32
    adv_ptr,  # advantages
    coef_ptr,  # normaliser c_s
    seq_lr_ptr,  # sequence log-ratio lr_s (SEQ_LEVEL)
    seq_w_ptr,  # mean importance weight wbar_s (SEQ_LEVEL and HAS_IW)
    # Pointers, out
    dlogp_ptr,  # [n_tokens] fp32: d loss / d logp (WRITE_GRAD)
    terms_ptr,  # [5, terms_stride] fp32: m c l, m low, m high, m kl, m r
    # Sizes
    n_tokens,
    terms_stride,
    # Scalars
    beta,
    clip_low,  # 1 - eps_low
    clip_high,  # 1 + eps_high
    # Compile-time switches
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr,
    HAS_IW: tl.constexpr,
    SEQ_LEVEL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-token policy loss, KL, stats terms and d loss / d logp: the module docstring's formulas 3."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_tokens
    m = tl.load(mask_ptr + offs, mask=ok, other=0.0)
    sid = tl.load(seq_ptr + offs, mask=ok, other=0)
    adv = tl.load(adv_ptr + sid, mask=ok, other=0.0)
    coef = tl.load(coef_ptr + sid, mask=ok, other=0.0)
    logp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_IW:
        w = tl.load(iw_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK], 1.0, dtype=tl.float32)
    # 1. Ratio: of the token, or of its sequence (GSPO), and the weight its policy gradient carries.
    if SEQ_LEVEL:
        lr = tl.load(seq_lr_ptr + sid, mask=ok, other=0.0)
        if HAS_IW:
            grad_w = tl.load(seq_w_ptr + sid, mask=ok, other=0.0)
        else:
            grad_w = tl.full([BLOCK], 1.0, dtype=tl.float32)
    elif HAS_OLD:
        lr = logp - tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        grad_w = w
    else:
        lr = tl.zeros([BLOCK], dtype=tl.float32)
        grad_w = w
    ratio = tl.exp(lr)
    # 2. Clipped surrogate; flat in the ratio exactly where TRL counts a token as clipped.
    clipped_ratio = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    loss = -tl.minimum(ratio * adv, clipped_ratio * adv) * w
    low = (ratio < clip_low) & (adv < 0.0)
    high = (ratio > clip_high) & (adv > 0.0)
    grad = tl.where(low | high, 0.0, -adv * ratio) * grad_w
    # 3. KL to the reference policy (k3): in the loss when beta > 0, in the stats whenever given.
    kl = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_REF:
        delta = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32) - logp
        e = tl.exp(delta)
        kl = e - delta - 1.0
        if KL_IN_LOSS:
            loss += beta * kl
            grad += beta * (1.0 - e)
    # 4. Outputs: masked, normalised; masked and out-of-range tokens give exact zeros.
    m = tl.where(ok, m, 0.0)
    if WRITE_GRAD:
        tl.store(dlogp_ptr + offs, tl.where(m != 0.0, m * coef * grad, 0.0), mask=ok)
    tl.store(terms_ptr + offs, tl.where(m != 0.0, m * coef * loss, 0.0), mask=ok)
    tl.store(terms_ptr + terms_stride + offs, m * low.to(tl.float32), mask=ok)
    tl.store(terms_ptr + 2 * terms_stride + offs, m * high.to(tl.float32), mask=ok)
    tl.store(terms_ptr + 3 * terms_stride + offs, tl.where(m != 0.0, m * kl, 0.0), mask=ok)
    tl.store(terms_ptr + 4 * terms_stride + offs, tl.where(m != 0.0, m * ratio, 0.0), mask=ok)


@triton.jit
def _logprob_rows_kernel(
    # Pointers
    logits_ptr,  # [n_rows, n_cols] raw logits x, any float dtype (read only)
    targets_ptr,  # [n_rows] int64
    logp_ptr,  # [n_rows] fp32 out
    m2_ptr,  # [n_rows] fp32 out: max of z2 = z log2 e
    log2_s_ptr,  # [n_rows] fp32 out: log2 sum 2^(z2 - m2); log-sum-exp = (m2 + log2 s) ln 2
    entropy_ptr,  # [n_rows] fp32 out (ENTROPY)
    # Sizes and strides
    n_cols,
    logits_row_stride,
    # Scalars
    scale,  # log2(e) / temperature
    # Compile-time switches
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: one online pass over the vocabulary for log-sum-exp, log p(target) and entropy."""
    # int64: row * row_stride passes 2^31 for more than 2 G logits (14k rows at V = 152k).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    z2_target = tl.load(row_ptr + target).to(tl.float32) * scale
    # The running max starts at the target's logit (a finite lower bound), so no -inf - -inf appears.
    m2 = z2_target
    s = 0.0
    h = 0.0  # sum 2^(z2 - m2) (z2 - m2), for the entropy
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < n_cols
        z2 = tl.load(row_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale
        m2_new = tl.maximum(m2, tl.max(tl.where(ok, z2, float("-inf")), axis=0))
        alpha = tl.exp2(m2 - m2_new)
        dz = tl.where(ok, z2 - m2_new, 0.0)
        p = tl.where(ok, tl.exp2(dz), 0.0)
        if ENTROPY:
            h = alpha * (h + s * (m2 - m2_new)) + tl.sum(p * dz, axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m2 = m2_new
    log2_s = tl.log2(s)
    tl.store(m2_ptr + row, m2)
    tl.store(log2_s_ptr + row, log2_s)
    # log_softmax's order, (z_y - m) - log s: exact-ish when the target is the max.
    tl.store(logp_ptr + row, ((z2_target - m2) - log2_s) * _LN2)
    if ENTROPY:
        tl.store(entropy_ptr + row, (log2_s - h / s) * _LN2)


@triton.jit
def _logprob_grad_rows_kernel(
    # Pointers
    logits_ptr,  # [n_rows, n_cols] raw logits, overwritten with coef * d logp / d x
    targets_ptr,  # [n_rows] int64
    m2_ptr,  # [n_rows] fp32, from _logprob_rows_kernel
    log2_s_ptr,  # [n_rows] fp32, from _logprob_rows_kernel
    coef_ptr,  # [n_rows] fp32: d loss / d logp of the row
    # Sizes and strides
    n_cols,
    logits_row_stride,
    # Scalars
    scale,  # log2(e) / temperature
    inv_temperature,
    # Compile-time switches
    BLOCK_V: tl.constexpr,
):
    """One program per row, one pass: x <- coef (onehot(y) - softmax(x / T)) / T, in fp32, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    m2 = tl.load(m2_ptr + row)
    log2_s = tl.load(log2_s_ptr + row)
    coef = tl.load(coef_ptr + row) * inv_temperature
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < n_cols
        x = tl.load(row_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp2((x * scale - m2) - log2_s)  # (z2 - m) first: exact-ish near the max, like log_softmax
        grad = (tl.where(offs == target, 1.0, 0.0) - p) * coef
        tl.store(row_ptr + offs, grad.to(row_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# PyTorch references: the definitions, through autograd (the spec for every path)
# ----------------------------------------------------------------------------------------------------


class GroupAdvantages(NamedTuple):
    """`group_advantages`' result; advantages [B*G], the rest [B] (one per group), all fp32 except the flags."""

    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    zero_variance: torch.Tensor


class GRPOStats(NamedTuple):
    """Detached fp32 scalars over the masked tokens of one call: sums and counts, so that a caller can add them
    over micro-batches and all-reduce them (`stacked()` / `from_stacked()`) before dividing.

    tokens: masked tokens; low_clipped / high_clipped: tokens with r < 1 - eps_low and A < 0 / r > 1 + eps_high
    and A > 0 (TRL's definitions; sequence level: every masked token of such a sequence); kl_sum: sum of the
    k3 KL (0 when no ref_logprobs); ratio_sum: sum of r; entropy_sum: sum of the entropies (fused loss only,
    else 0).
    """

    tokens: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    kl_sum: torch.Tensor
    ratio_sum: torch.Tensor
    entropy_sum: torch.Tensor

    def _mean(self, total):
        return total / self.tokens.clamp(min=1)

    @property
    def clip_low_fraction(self):
        return self._mean(self.low_clipped)

    @property
    def clip_high_fraction(self):
        return self._mean(self.high_clipped)

    @property
    def clip_region_fraction(self):
        return self._mean(self.low_clipped + self.high_clipped)  # disjoint: A < 0 vs A > 0

    @property
    def kl_mean(self):
        return self._mean(self.kl_sum)

    @property
    def ratio_mean(self):
        return self._mean(self.ratio_sum)

    @property
    def entropy_mean(self):
        return self._mean(self.entropy_sum)

    def stacked(self) -> torch.Tensor:
        """All six as one fp32 [6] tensor (one all-reduce)."""
        return torch.stack(tuple(self))

    @classmethod
    def from_stacked(cls, stacked: torch.Tensor) -> "GRPOStats":
        return cls(*stacked.unbind(0))


def group_advantages_reference(rewards, group_size, *, scale="group", eps=1e-4):
    """The definition in PyTorch (also the CPU path); same arguments and result as `group_advantages`."""
    n_groups = _check_advantage_inputs(rewards, group_size, scale, eps)
    r = rewards.detach().float().view(n_groups, group_size)
    valid = ~torch.isnan(r)
    count = valid.sum(1).float()
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
        flat = r[valid]
        batch_std = flat.std() if flat.numel() > 1 else r.new_zeros(())
        denom = (batch_std + eps).expand(n_groups)
    else:
        denom = torch.ones_like(std)
    adv = torch.where(valid & ~zero_var[:, None], (r - mean[:, None]) / denom[:, None], 0.0)
    return GroupAdvantages(adv.reshape(-1), mean, std, zero_var)


def linear_logprobs_reference(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Unchunked definition on full fp32 [N, V] logits (fp64 for fp64 inputs: the tests' truth); same arguments
    and result as `fused_linear_logprobs` (here the entropy is differentiable)."""
    _check_values(_check_linear_inputs(hidden, weight, targets, None))
    _check_temperature(temperature)
    dtype = _compute_dtype(hidden)
    logq = torch.log_softmax((hidden.to(dtype) @ weight.to(dtype).T) / temperature, dim=1)
    logp = logq.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if not return_entropy:
        return logp
    return logp, -(logq.exp() * logq).sum(1)


def grpo_loss_reference(
    logprobs, old_logprobs, advantages, seq_ids, *, mask=None, ref_logprobs=None, beta=0.0, epsilon_low=0.2,
    epsilon_high=0.2, loss_type="dapo", importance_sampling_level="token", max_completion_length=None,
    num_items_in_batch=None, num_sequences=None, importance_weights=None,
):
    """The definition, TRL's formulas on packed tensors through autograd; same arguments and result as
    `grpo_loss` (module docstring, 3)."""
    opts = _check_loss_options(
        beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level, max_completion_length,
        num_items_in_batch, num_sequences, ref_logprobs is not None,
    )
    _check_logprobs(logprobs, "logprobs")
    _check_values(_check_token_inputs(logprobs.shape[0], logprobs.device, old_logprobs, advantages, seq_ids, mask,
                                      ref_logprobs, importance_weights))
    return _grpo_loss_definition(logprobs, old_logprobs, advantages, seq_ids, mask, ref_logprobs,
                                 importance_weights, opts)


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grpo_loss_definition(logprobs, old, advantages, seq_ids, mask, ref, iw, opts):
    n_seqs, device, dtype = advantages.shape[0], logprobs.device, _compute_dtype(logprobs)
    seq = seq_ids.long()
    logp = logprobs.to(dtype)
    old = logp.detach() if old is None else old.detach().to(dtype)
    m = torch.ones_like(logp) if mask is None else mask.detach().to(dtype)
    count = torch.zeros(n_seqs, dtype=dtype, device=device).index_add(0, seq, m)
    log_ratio = logp - old
    if opts.level == "sequence":
        seq_lr = torch.zeros(n_seqs, dtype=dtype, device=device).index_add(0, seq, log_ratio * m) / count.clamp(min=1)
        log_ratio = seq_lr[seq]
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(dtype)[seq]
    clipped = torch.clamp(ratio, 1 - opts.epsilon_low, 1 + opts.epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if iw is not None:
        per_token = per_token * iw.detach().to(dtype)
    kl = torch.zeros_like(logp)
    if ref is not None:
        delta = ref.detach().to(dtype) - logp
        kl = torch.exp(delta) - delta - 1
        if opts.beta != 0.0:
            per_token = per_token + opts.beta * kl
    n_seq_global, n_items = (c.to(dtype) for c in _global_counts(opts, n_seqs, m, device))
    if opts.loss_type == "grpo":
        per_seq = torch.zeros(n_seqs, dtype=dtype, device=device).index_add(0, seq, per_token * m) / count.clamp(min=1)
        loss = per_seq.sum() / n_seq_global
    elif opts.loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (n_seq_global * opts.max_completion_length)
    else:
        loss = (per_token * m).sum() / n_items
    low = (ratio < 1 - opts.epsilon_low) & (adv < 0)
    high = (ratio > 1 + opts.epsilon_high) & (adv > 0)
    sums = [m.sum(), (low * m).sum(), (high * m).sum(), (kl * m).sum(), (ratio * m).sum(), m.new_zeros(())]
    return loss, GRPOStats(*(t.detach() for t in sums))


def linear_grpo_loss_reference(
    hidden, weight, targets, old_logprobs, advantages, seq_ids, *, temperature=1.0, **loss_kwargs
):
    """Unchunked definition of `fused_linear_grpo_loss`: full fp32 logits, `linear_logprobs_reference`, then
    `grpo_loss_reference` (same keyword arguments), plus the entropy sum over masked tokens."""
    logp, entropy = linear_logprobs_reference(hidden, weight, targets, temperature=temperature, return_entropy=True)
    loss, stats = grpo_loss_reference(logp, old_logprobs, advantages, seq_ids, **loss_kwargs)
    mask = loss_kwargs.get("mask")
    m = torch.ones_like(entropy) if mask is None else mask.to(entropy.dtype)
    return loss, stats._replace(entropy_sum=(entropy * m).sum().detach())


# ----------------------------------------------------------------------------------------------------
# Input checks (shared by every path): ValueError naming the argument and the cause
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LossOptions:
    beta: float
    epsilon_low: float
    epsilon_high: float
    loss_type: str
    level: str
    max_completion_length: int | None
    num_items_in_batch: object  # None, a number or a 0-d tensor
    num_sequences: object
    temperature: float = 1.0


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_finite(name, value, low=None, high=None):
    if not _is_number(value) or not math.isfinite(value) or (low is not None and value < low) or (
        high is not None and value > high
    ):
        bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")


def _check_temperature(temperature):
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_count(name, value):
    """None, a positive number, or a one-element tensor (not checked: reading it would sync the host)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be None, a number > 0 or a one-element tensor, got {value!r}")


def _check_loss_options(beta, epsilon_low, epsilon_high, loss_type, level, max_completion_length,
                        num_items_in_batch, num_sequences, has_ref, temperature=1.0):
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if level not in _LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {_LEVELS}, got {level!r}")
    _check_finite("beta", beta, low=0.0)
    _check_finite("epsilon_low", epsilon_low, low=0.0, high=1.0)
    _check_finite("epsilon_high", epsilon_high, low=0.0)
    if beta != 0.0 and not has_ref:
        raise ValueError(f"beta = {beta} > 0 needs ref_logprobs (the reference policy's log-probs)")
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):
        raise ValueError(f"max_completion_length must be None or a positive int, got {max_completion_length!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (its normaliser is S * L_max)")
    _check_count("num_items_in_batch", num_items_in_batch)
    _check_count("num_sequences", num_sequences)
    _check_temperature(temperature)
    return _LossOptions(float(beta), float(epsilon_low), float(epsilon_high), loss_type, level,
                        max_completion_length, num_items_in_batch, num_sequences, float(temperature))


def _check_logprobs(t, name):
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N] (packed tokens), got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def _check_token_inputs(n, device, old, advantages, seq_ids, mask, ref, iw):
    """Shapes, dtypes and devices of the per-token / per-sequence tensors; returns the value checks (for one
    host sync in `_check_values`, together with the targets')."""
    for name, t in (("old_logprobs", old), ("ref_logprobs", ref), ("importance_weights", iw)):
        if t is not None:
            _check_logprobs(t, name)
            if t.shape[0] != n:
                raise ValueError(f"{name} must have N = {n} entries (one per token), got {t.shape[0]}")
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1 or not advantages.dtype.is_floating_point:
        raise ValueError("advantages must be a 1-D floating tensor [S] (one per sequence), got "
                         f"{getattr(advantages, 'shape', advantages)} {getattr(advantages, 'dtype', '')}")
    if seq_ids.dim() != 1 or seq_ids.shape[0] != n:
        raise ValueError(f"seq_ids must be 1-D with N = {n} entries (one per token), got shape {tuple(seq_ids.shape)}")
    if seq_ids.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"seq_ids must have an integer dtype, got {seq_ids.dtype}")
    if mask is not None:
        if mask.dim() != 1 or mask.shape[0] != n:
            raise ValueError(f"mask must be 1-D with N = {n} entries (one per token), got shape {tuple(mask.shape)}")
        if mask.dtype.is_complex:
            raise ValueError(f"mask must be bool or hold 0 / 1, got {mask.dtype}")
    tensors = {"advantages": advantages, "seq_ids": seq_ids, "old_logprobs": old, "ref_logprobs": ref,
               "importance_weights": iw, "mask": mask}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if any(d != device for d in devices.values()):
        raise ValueError(f"all tensors must be on the device of the log-probs ({device}), got "
                         + ", ".join(f"{k}: {v}" for k, v in devices.items()))
    # One host sync for every value check: an out-of-range id would index out of bounds in a kernel.
    n_seqs = advantages.shape[0]
    checks = [("seq_ids", seq_ids, (seq_ids < 0) | (seq_ids >= n_seqs), f"must lie in [0, S) = [0, {n_seqs})")]
    if mask is not None and mask.dtype != torch.bool:
        checks.append(("mask", mask, (mask != 0) & (mask != 1), "must be bool or hold only 0 and 1"))
    return checks


def _check_values(checks):
    """checks: (name, values [N], bad [N] bool, what they must be); one host sync, then a ValueError naming
    the first failing argument and its first bad entry."""
    checks = [c for c in checks if c[2].numel()]
    if not checks:
        return
    flags = torch.stack([bad.any() for _, _, bad, _ in checks]).tolist()
    for (name, values, bad, must), flag in zip(checks, flags):
        if flag:
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} {must}; {name}[{i}] = {values[i].item()}")


def _check_linear_inputs(hidden, weight, targets, chunk_size):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    n, d = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight.shape[1] ({weight.shape[1]}) must equal hidden.shape[1] ({d}): hidden is "
                         f"[N, d] = {tuple(hidden.shape)}, weight is [V, d] = {tuple(weight.shape)}")
    if v == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype ({weight.dtype}) must equal hidden dtype ({hidden.dtype})")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be 1-D with N = {n} entries (one per row), got shape {tuple(targets.shape)}")
    if targets.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"targets must have an integer dtype, got {targets.dtype}")
    if len({hidden.device, weight.device, targets.device}) != 1:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return [("targets", targets, (targets < 0) | (targets >= v), f"must lie in [0, V) = [0, {v})")]


def _check_advantage_inputs(rewards, group_size, scale, eps):
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    _check_finite("eps", eps, low=0.0)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B * G], got shape {tuple(getattr(rewards, 'shape', ()))}")
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be floating point, got {rewards.dtype}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards has {rewards.shape[0]} entries, not a multiple of group_size = {group_size} "
                         "(groups of G completions, contiguous)")
    return rewards.shape[0] // group_size


# ----------------------------------------------------------------------------------------------------
# Normalisers and the per-token inputs of the kernel paths
# ----------------------------------------------------------------------------------------------------


def _device_scalar(value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _global_counts(opts, n_seqs, m, device):
    """(S_g, D_g): the step's global sequence and masked-token counts (local when not given), fp32 0-d
    tensors clamped to >= 1 (no host sync when the caller passes tensors)."""
    s = n_seqs if opts.num_sequences is None else opts.num_sequences
    d = m.sum() if opts.num_items_in_batch is None else opts.num_items_in_batch
    return _device_scalar(s, device).clamp(min=1), _device_scalar(d, device).clamp(min=1)


@dataclass
class _TokenInputs:
    """The constant per-token ([N]) and per-sequence ([S]) tensors of the kernel paths, contiguous."""

    old: torch.Tensor | None  # any float dtype
    ref: torch.Tensor | None
    iw: torch.Tensor | None
    mask: torch.Tensor  # fp32 0 / 1
    seq: torch.Tensor  # int64
    adv: torch.Tensor  # [S] fp32
    coef: torch.Tensor  # [S] fp32: the normaliser c_s
    count: torch.Tensor  # [S] fp32: masked tokens per sequence

    def rows(self, rows: slice) -> "_TokenInputs":
        cut = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(self, old=cut(self.old), ref=cut(self.ref), iw=cut(self.iw), mask=self.mask[rows],
                       seq=self.seq[rows])


def _token_inputs(n, device, old, advantages, seq_ids, mask, ref, iw, opts):
    const = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731
    m = torch.ones(n, dtype=torch.float32, device=device) if mask is None else mask.detach().float().contiguous()
    seq = seq_ids.detach().long().contiguous()
    n_seqs = advantages.shape[0]
    count = torch.zeros(n_seqs, dtype=torch.float32, device=device).index_add_(0, seq, m)
    n_seq_global, n_items = _global_counts(opts, n_seqs, m, device)
    if opts.loss_type == "grpo":
        coef = 1.0 / (count.clamp(min=1) * n_seq_global)
    elif opts.loss_type == "dr_grpo":
        coef = (1.0 / (n_seq_global * opts.max_completion_length)).expand(n_seqs).contiguous()
    else:
        coef = (1.0 / n_items).expand(n_seqs).contiguous()
    return _TokenInputs(const(old), const(ref), const(iw), m, seq, advantages.detach().float().contiguous(),
                        coef, count)


def _sequence_inputs(logp, tok, opts):
    """GSPO: per-sequence log-ratio lr_s (masked mean) and mean importance weight wbar_s (None without weights)."""
    n_seqs = tok.adv.shape[0]
    per_seq = lambda x: torch.zeros(n_seqs, dtype=torch.float32, device=logp.device).index_add_(  # noqa: E731
        0, tok.seq, x * tok.mask) / tok.count.clamp(min=1)
    seq_lr = per_seq(logp - tok.old.float()) if tok.old is not None else torch.zeros_like(tok.adv)
    seq_w = per_seq(tok.iw.float()) if tok.iw is not None else None
    return seq_lr, seq_w


# ----------------------------------------------------------------------------------------------------
# Per-token terms: the PyTorch twin of `_grpo_token_kernel` and its launcher
# ----------------------------------------------------------------------------------------------------


def _torch_token_terms(logp, tok, seq_lr, seq_w, opts, write_grad):
    """Same outputs as `_launch_token_terms`, in PyTorch (the chunked reference path)."""
    logp = logp.float()
    m, adv, coef = tok.mask, tok.adv[tok.seq], tok.coef[tok.seq]
    w = None if tok.iw is None else tok.iw.float()
    if opts.level == "sequence":
        lr = seq_lr[tok.seq]
        grad_w = None if seq_w is None else seq_w[tok.seq]
    else:
        lr = logp - tok.old.float() if tok.old is not None else torch.zeros_like(logp)
        grad_w = w
    ratio = torch.exp(lr)
    clipped = ratio.clamp(1 - opts.epsilon_low, 1 + opts.epsilon_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    if w is not None:
        loss = loss * w
    low = (ratio < 1 - opts.epsilon_low) & (adv < 0)
    high = (ratio > 1 + opts.epsilon_high) & (adv > 0)
    grad = torch.where(low | high, 0.0, -adv * ratio)
    if grad_w is not None:
        grad = grad * grad_w
    kl = torch.zeros_like(logp)
    if tok.ref is not None:
        delta = tok.ref.float() - logp
        e = torch.exp(delta)
        kl = e - delta - 1
        if opts.beta != 0.0:
            loss = loss + opts.beta * kl
            grad = grad + opts.beta * (1 - e)
    on = m != 0
    terms = torch.stack([torch.where(on, m * coef * loss, 0.0), m * low, m * high, torch.where(on, m * kl, 0.0),
                         torch.where(on, m * ratio, 0.0)])
    return (torch.where(on, m * coef * grad, 0.0) if write_grad else None), terms


def _launch_token_terms(logp, tok, seq_lr, seq_w, opts, write_grad):
    """Run `_grpo_token_kernel`: returns (d loss / d logp [n] fp32 or None, terms [5, n] fp32)."""
    n = logp.shape[0]
    terms = torch.empty(5, n, dtype=torch.float32, device=logp.device)
    dlogp = torch.empty(n, dtype=torch.float32, device=logp.device) if write_grad else None
    if n == 0:
        return dlogp, terms
    seq_level = opts.level == "sequence"
    either = lambda t: tok.mask if t is None else t  # noqa: E731  (never read: its flag is off)
    _grpo_token_kernel[(triton.cdiv(n, _TOKEN_BLOCK),)](
        logp.contiguous(), either(tok.old), either(tok.ref), either(tok.iw), tok.mask, tok.seq,
        tok.adv, tok.coef, either(seq_lr), either(seq_w),
        either(dlogp), terms,
        n, terms.stride(0),
        opts.beta, 1.0 - opts.epsilon_low, 1.0 + opts.epsilon_high,
        HAS_OLD=tok.old is not None, HAS_REF=tok.ref is not None, KL_IN_LOSS=tok.ref is not None and opts.beta != 0,
        HAS_IW=tok.iw is not None, SEQ_LEVEL=seq_level, WRITE_GRAD=write_grad, BLOCK=_TOKEN_BLOCK,
    )
    return dlogp, terms


def _token_terms(logp, tok, seq_lr, seq_w, opts, write_grad, use_triton):
    fn = _launch_token_terms if use_triton else _torch_token_terms
    return fn(logp, tok, seq_lr, seq_w, opts, write_grad)


# ----------------------------------------------------------------------------------------------------
# One chunk of rows: PyTorch steps and Triton launchers
# ----------------------------------------------------------------------------------------------------


def _block_v(v):
    block_v = min(triton.next_power_of_2(v), _MAX_BLOCK_V)
    return block_v, 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4


def _row_logprobs(logits, targets, inv_t, entropy, use_triton, scratch=None):
    """Row statistics of one chunk of raw logits [c, V]: (logp, m, log s, entropy or None), fp32 [c], and
    the softmax numerators.

    Triton: m and log s in log2 units, the logits left intact, numerators None. PyTorch: natural units, the
    fp32 logits overwritten (with (z - m), then (z - m) exp(z - m) for the entropy), and numerators =
    exp(z - m) [c, V] (written into `scratch` when given; `_row_dlogits(..., numerators=...)` turns them into
    the gradient in place): one exp pass serves the sum, the entropy and the gradient.
    """
    c, v = logits.shape
    if use_triton:
        logp, m2, log2_s, ent = (torch.empty(c, dtype=torch.float32, device=logits.device) for _ in range(4))
        if c:
            block_v, warps = _block_v(v)
            _logprob_rows_kernel[(c,)](
                logits, targets, logp, m2, log2_s, ent, v, logits.stride(0), _LOG2E.value * inv_t,
                ENTROPY=entropy, BLOCK_V=block_v, num_warps=warps,
            )
        return logp, m2, log2_s, ent if entropy else None, None
    z = logits.mul_(inv_t) if inv_t != 1.0 else logits
    m = z.amax(dim=1, keepdim=True)
    shifted = z.sub_(m)
    numerators = shifted.exp() if scratch is None else torch.exp(shifted, out=scratch)
    s = numerators.sum(dim=1)
    log_s = s.log()
    # log_softmax's order, (z_y - m) - log s: exact-ish when the target is the max.
    logp = shifted.gather(1, targets.unsqueeze(1)).squeeze(1) - log_s
    ent = None
    if entropy:  # H = log s - sum_v e_v (z_v - m) / s, the Triton kernel's form; the logits are spent here
        ent = log_s - shifted.mul_(numerators).sum(dim=1) / s
    return logp, m.squeeze(1), log_s, ent, numerators


def _row_dlogits(logits, targets, row_stats, coef, inv_t, use_triton, numerators=None):
    """coef_t * d logp_t / d x_t = coef_t (onehot - softmax) / T for one chunk, written in place and returned.

    row_stats: (logp, m, log s) of these rows from `_row_logprobs` (same path); coef: fp32 [c]. Triton: over
    the raw logits. PyTorch: over `numerators` from `_row_logprobs` when given, else over the raw fp32 logits
    (which become exp(z - m) first).
    """
    logp, m, log_s = row_stats
    c, v = logits.shape
    if use_triton:
        if c:
            block_v, warps = _block_v(v)
            _logprob_grad_rows_kernel[(c,)](
                logits, targets, m, log_s, coef, v, logits.stride(0), _LOG2E.value * inv_t, inv_t,
                BLOCK_V=block_v, num_warps=warps,
            )
        return logits
    if numerators is None:
        numerators = logits.mul_(inv_t).sub_(m.unsqueeze(1)).exp_()
    g = (coef * inv_t).unsqueeze(1)
    grad = numerators.mul_(-g * torch.exp(-log_s).unsqueeze(1))  # -g softmax
    # The target entry as (1 - p) = -expm1(logp): no cancellation when p -> 1.
    return grad.scatter_(1, targets.unsqueeze(1), -torch.expm1(logp).unsqueeze(1) * g)


def _accumulate_grads(dlogits, h, w, rows, grad_hidden, grad_weight32):
    """One chunk's rows of d hidden, and its share of d weight added into the fp32 accumulator."""
    if grad_hidden is not None:
        grad_hidden[rows] = dlogits @ w
    if grad_weight32 is not None:
        add_weight_grad(grad_weight32, dlogits, h)


# ----------------------------------------------------------------------------------------------------
# The chunk loops (both paths)
# ----------------------------------------------------------------------------------------------------


class _ChunkLoop:
    """The chunks of rows and the matmul that makes their logits [c, V] into one reused buffer: in the input
    dtype (Triton), or fp32 from an fp32 copy of the weight (PyTorch). The PyTorch path also gets a reused
    fp32 scratch buffer of the same shape (`scratch`, for the softmax numerators): reusing both, rather than
    allocating per chunk, saves the page faults of fresh large allocations on CPU."""

    def __init__(self, hidden, weight, chunk, use_triton, scratch=True):
        self.hidden, self.use_triton, self.n, self.chunk = hidden, use_triton, hidden.shape[0], chunk
        self.w = weight if use_triton else weight.float()
        shape = (min(chunk, self.n), weight.shape[0])
        self.buf = hidden.new_empty(shape, dtype=hidden.dtype if use_triton else torch.float32)
        self.scratch = hidden.new_empty(shape, dtype=torch.float32) if scratch and not use_triton else None

    def __iter__(self):
        """Yields (rows, logits, scratch or None), views of the reused buffers."""
        for start in range(0, self.n, self.chunk):
            rows = slice(start, min(start + self.chunk, self.n))
            c = rows.stop - start
            h = self.hidden[rows] if self.use_triton else self.hidden[rows].float()
            yield rows, torch.mm(h, self.w.T, out=self.buf[:c]), None if self.scratch is None else self.scratch[:c]

    def grad_buffers(self, weight, need):
        """(d hidden in hidden's dtype, d weight fp32 accumulator), None where not needed."""
        need_h, need_w = need
        return (torch.empty_like(self.hidden) if need_h else None,
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None)


def _logprob_pass(hidden, weight, targets, inv_t, chunk, entropy, use_triton):
    """Row statistics of every row, no gradients: (logp, m, log s, entropy or None), fp32 [N]."""
    out = [torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) for _ in range(4)]
    for rows, logits, scratch in _ChunkLoop(hidden, weight, chunk, use_triton):
        for buf, value in zip(out, _row_logprobs(logits, targets[rows], inv_t, entropy, use_triton, scratch)[:4]):
            if value is not None:
                buf[rows] = value
    return (*out[:3], out[3] if entropy else None)


def _grad_pass(hidden, weight, targets, row_stats, coef, inv_t, chunk, need, use_triton):
    """Gradients of sum_t coef_t logp_t for hidden and weight, the logits recomputed chunk by chunk."""
    loop = _ChunkLoop(hidden, weight, chunk, use_triton, scratch=False)
    grad_hidden, grad_weight32 = loop.grad_buffers(weight, need)
    for rows, logits, _ in loop:
        stats = tuple(t[rows] for t in row_stats)
        dlogits = _row_dlogits(logits, targets[rows], stats, coef[rows], inv_t, use_triton)
        _accumulate_grads(dlogits, hidden[rows], loop.w, rows, grad_hidden, grad_weight32)
    return grad_hidden, grad_weight32


def _token_level_pass(hidden, weight, targets, tok, opts, chunk, need, use_triton):
    """Token-level fused GRPO: one pass; each chunk's logits become its gradient while live.

    Returns (entropy [N], terms [5, N], d hidden, d weight fp32)."""
    n, inv_t, write_grad = hidden.shape[0], 1.0 / opts.temperature, any(need)
    loop = _ChunkLoop(hidden, weight, chunk, use_triton)
    grad_hidden, grad_weight32 = loop.grad_buffers(weight, need)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    terms = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
    for rows, logits, scratch in loop:
        logp, m, log_s, entropy[rows], numerators = _row_logprobs(logits, targets[rows], inv_t, True, use_triton,
                                                                  scratch)
        dlogp, terms[:, rows] = _token_terms(logp, tok.rows(rows), None, None, opts, write_grad, use_triton)
        if write_grad:
            dlogits = _row_dlogits(logits, targets[rows], (logp, m, log_s), dlogp, inv_t, use_triton, numerators)
            _accumulate_grads(dlogits, hidden[rows], loop.w, rows, grad_hidden, grad_weight32)
    return entropy, terms, grad_hidden, grad_weight32


def _sequence_level_pass(hidden, weight, targets, tok, opts, chunk, need, use_triton):
    """Sequence-level (GSPO) fused GRPO: pass 1 row statistics, then ratios, then pass 2 gradients."""
    inv_t = 1.0 / opts.temperature
    logp, m, log_s, entropy = _logprob_pass(hidden, weight, targets, inv_t, chunk, True, use_triton)
    seq_lr, seq_w = _sequence_inputs(logp, tok, opts)
    dlogp, terms = _token_terms(logp, tok, seq_lr, seq_w, opts, any(need), use_triton)
    grads = (None, None)
    if any(need):
        grads = _grad_pass(hidden, weight, targets, (logp, m, log_s), dlogp, inv_t, chunk, need, use_triton)
    return entropy, terms, *grads


# ----------------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------------


def _scaled(grad, scale, dtype):
    """grad * scale, multiplied in grad's precision (fp32 accumulators) and rounded once into dtype."""
    return None if grad is None else torch.mul(grad, scale, out=torch.empty_like(grad, dtype=dtype))


class _LinearLogprobs(torch.autograd.Function):
    """Chunked log-probs (and entropy, no gradient); backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, chunk, entropy, use_triton):
        with torch.autocast(hidden.device.type, enabled=False):
            logp, m, log_s, ent = _logprob_pass(hidden, weight, targets, inv_t, chunk, entropy, use_triton)
        ctx.save_for_backward(hidden, weight, targets, logp, m, log_s)
        ctx.inv_t, ctx.chunk, ctx.use_triton = inv_t, chunk, use_triton
        ent = logp.new_empty(0) if ent is None else ent
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, *row_stats = ctx.saved_tensors
        need = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight32 = _grad_pass(
                hidden, weight, targets, row_stats, grad_logp.float().contiguous(), ctx.inv_t, ctx.chunk, need,
                ctx.use_triton,
            )
        grad_weight = None if grad_weight32 is None else grad_weight32.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


class _LinearGRPOLoss(torch.autograd.Function):
    """Fused GRPO loss: gradients computed in the forward; backward scales them by the scalar grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tok, opts, chunk, need, use_triton):
        level_pass = _token_level_pass if opts.level == "token" else _sequence_level_pass
        with torch.autocast(hidden.device.type, enabled=False):
            entropy, terms, grad_hidden, grad_weight32 = level_pass(
                hidden, weight, targets, tok, opts, chunk, need, use_triton
            )
        ctx.save_for_backward(grad_hidden, grad_weight32)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        sums = torch.cat([terms[1:].sum(dim=1), torch.where(tok.mask != 0, entropy, 0.0).sum().unsqueeze(0)])
        ctx.mark_non_differentiable(sums)
        return terms[0].sum(), sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        grads = (_scaled(g, grad_loss, dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (*grads, None, None, None, None, None, None)


class _GRPOLoss(torch.autograd.Function):
    """GRPO loss on given log-probs (Triton path): d loss / d logp written by the token kernel in the forward."""

    @staticmethod
    def forward(ctx, logprobs, tok, opts, write_grad):
        logp = logprobs.detach()
        seq_lr, seq_w = _sequence_inputs(logp, tok, opts) if opts.level == "sequence" else (None, None)
        dlogp, terms = _launch_token_terms(logp, tok, seq_lr, seq_w, opts, write_grad)
        ctx.save_for_backward(dlogp)
        ctx.dtype = logprobs.dtype
        sums = terms[1:].sum(dim=1)
        ctx.mark_non_differentiable(sums)
        return terms[0].sum(), sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        (dlogp,) = ctx.saved_tensors
        return _scaled(dlogp, grad_loss, ctx.dtype), None, None, None


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


# Interpreted or compiled is fixed at import (kernels.dispatch): this module's kernels and tl.max / tl.sum.
_KERNELS_INTERPRETED = all_interpreted(_grpo_token_kernel)


def _use_triton(backend: str, device: torch.device) -> bool:
    return use_triton(backend, device, _KERNELS_INTERPRETED, "kernels.grpo")


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4, backend="auto") -> GroupAdvantages:
    """Group-relative advantages of G completions per prompt (module docstring, 1), in one Triton kernel.

    Args:
        rewards: [B * G] float, the G rewards of each prompt contiguous; NaN = unscorable (advantage 0, left
            out of the statistics).
        group_size: G >= 1 (G = 1 gives advantages 0).
        scale: "group" (divide by the group's std + eps), "batch" (by the whole batch's std + eps, TRL's
            scale_rewards="batch"), "none" (Dr. GRPO: no division).
        eps: added to the std before dividing (TRL: 1e-4).
        backend: "auto" | "triton" | "reference".

    Returns GroupAdvantages(advantages [B*G] fp32, mean [B] fp32, std [B] fp32 (unbiased; 0 for fewer than
    two rewards), zero_variance [B] bool (all non-NaN rewards of the group equal: no learning signal)).
    No gradient. Raises ValueError for a bad shape, group_size, scale or eps.
    """
    n_groups = _check_advantage_inputs(rewards, group_size, scale, eps)
    if not _use_triton(backend, rewards.device):
        return group_advantages_reference(rewards, group_size, scale=scale, eps=eps)
    r = rewards.detach().contiguous()
    out = GroupAdvantages(
        torch.empty(r.shape[0], dtype=torch.float32, device=r.device),
        *(torch.empty(n_groups, dtype=torch.float32, device=r.device) for _ in range(2)),
        torch.empty(n_groups, dtype=torch.int8, device=r.device),
    )
    if n_groups:
        block_g = min(triton.next_power_of_2(group_size), _ADVANTAGE_TILE)
        block_b = max(1, min(triton.next_power_of_2(n_groups), _ADVANTAGE_TILE // block_g))
        _group_advantages_kernel[(1,)](
            r, *out, r.shape[0], n_groups, group_size, float(eps),
            SCALE=_SCALES.index(scale), BLOCK_B=block_b, BLOCK_G=block_g,
        )
    return out._replace(zero_variance=out.zero_variance.bool())


def fused_linear_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False, chunk_size=None,
                          backend="auto"):
    """Log-probs of `targets` under softmax(hidden @ weight.T / temperature), without the [N, V] logits.

    Args:
        hidden: [N, d] final hidden states (fp32 / fp16 / bf16); weight: [V, d] LM head, same dtype.
        targets: [N] integer token ids in [0, V).
        temperature: T > 0 (the sampling temperature: log-probs of the distribution the tokens came from).
        return_entropy: also return each row's entropy (fp32 [N], no gradient).
        chunk_size: rows per chunk; default: rows whose logits fit 512 MiB (Triton, input dtype, multiple of
            128) or 64 MiB (PyTorch, fp32).
        backend: "auto" | "triton" | "reference".

    Returns logprobs fp32 [N], or (logprobs, entropy). Gradients flow to hidden and weight (fp32 accumulation,
    rounded into their dtype); backward recomputes the logits one chunk at a time (8NdV FLOPs in all).
    """
    checks = _check_linear_inputs(hidden, weight, targets, chunk_size)
    _check_temperature(temperature)
    _check_values(checks)
    use_triton = _use_triton(backend, hidden.device)
    n, v = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or _default_chunk_size(n, v, use_triton, hidden.element_size())
    logp, entropy = _LinearLogprobs.apply(
        hidden, weight, targets.long().contiguous(), 1.0 / temperature, chunk, return_entropy, use_triton
    )
    return (logp, entropy) if return_entropy else logp


def grpo_loss(logprobs, old_logprobs, advantages, seq_ids, *, mask=None, ref_logprobs=None, beta=0.0,
              epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", importance_sampling_level="token",
              max_completion_length=None, num_items_in_batch=None, num_sequences=None, importance_weights=None,
              backend="auto"):
    """The GRPO loss of packed per-token log-probs (module docstring, 3): TRL 1.16's `_compute_loss`.

    Args:
        logprobs: [N] current log-probs of the sampled tokens (any float dtype; gets the gradient).
        old_logprobs: [N] log-probs under the policy that sampled (None: on-policy, ratio 1).
        advantages: [S] one per sequence; seq_ids: [N] int in [0, S), each token's sequence.
        mask: [N] bool or 0 / 1: tokens that count (None: all).
        ref_logprobs: [N] reference-policy log-probs (needed when beta > 0; gives stats.kl_sum when given).
        beta: KL coefficient >= 0. epsilon_low / epsilon_high: clip range [1 - eps_low, 1 + eps_high].
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo". importance_sampling_level: "token" | "sequence" (GSPO).
        max_completion_length: L_max, needed by "dr_grpo".
        num_items_in_batch: the step's global masked-token count ("bnpo", "dapo"; default: local count).
        num_sequences: the step's global sequence count ("grpo", "dr_grpo"; default: local S).
            Both may be numbers or one-element tensors (no host sync).
        importance_weights: [N] truncated importance-sampling weights (vLLM vs trainer), multiplying the
            policy term before the KL term is added (TRL's importance_sampling_ratio).
        backend: "auto" | "triton" | "reference" (the autograd definition).

    Returns (loss: fp32 scalar, GRPOStats with entropy_sum 0). Raises ValueError naming the argument.
    """
    opts = _check_loss_options(beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level,
                               max_completion_length, num_items_in_batch, num_sequences, ref_logprobs is not None)
    _check_logprobs(logprobs, "logprobs")
    n, device = logprobs.shape[0], logprobs.device
    _check_values(_check_token_inputs(n, device, old_logprobs, advantages, seq_ids, mask, ref_logprobs,
                                      importance_weights))
    if not _use_triton(backend, device):
        return _grpo_loss_definition(logprobs, old_logprobs, advantages, seq_ids, mask, ref_logprobs,
                                     importance_weights, opts)
    tok = _token_inputs(n, device, old_logprobs, advantages, seq_ids, mask, ref_logprobs, importance_weights, opts)
    write_grad = torch.is_grad_enabled() and logprobs.requires_grad
    loss, sums = _GRPOLoss.apply(logprobs, tok, opts, write_grad)
    return loss, GRPOStats(tok.mask.sum(), *sums.unbind(0), sums.new_zeros(()))


def fused_linear_grpo_loss(hidden, weight, targets, old_logprobs, advantages, seq_ids, *, mask=None,
                           ref_logprobs=None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
                           importance_sampling_level="token", max_completion_length=None, num_items_in_batch=None,
                           num_sequences=None, importance_weights=None, temperature=1.0, chunk_size=None,
                           backend="auto"):
    """From final hidden states to the GRPO loss in one chunked pass (module docstring, 4).

    hidden [N, d], weight [V, d] (same float dtype), targets [N] (the sampled token ids), temperature and
    chunk_size as in `fused_linear_logprobs`; every other argument as in `grpo_loss`. Returns (loss: fp32
    scalar, GRPOStats, entropy_sum included). Gradients for hidden and weight are computed during the forward
    (backward only scales them). Token level: 6NdV FLOPs, one pass; sequence level: 8NdV, two passes.
    """
    opts = _check_loss_options(beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level,
                               max_completion_length, num_items_in_batch, num_sequences, ref_logprobs is not None,
                               temperature)
    checks = _check_linear_inputs(hidden, weight, targets, chunk_size)
    n, device = hidden.shape[0], hidden.device
    checks += _check_token_inputs(n, device, old_logprobs, advantages, seq_ids, mask, ref_logprobs,
                                  importance_weights)
    _check_values(checks)
    use_triton = _use_triton(backend, device)
    chunk = chunk_size or _default_chunk_size(n, weight.shape[0], use_triton, hidden.element_size())
    tok = _token_inputs(n, device, old_logprobs, advantages, seq_ids, mask, ref_logprobs, importance_weights, opts)
    need = tuple(torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight))
    loss, sums = _LinearGRPOLoss.apply(hidden, weight, targets.long().contiguous(), tok, opts, chunk, need,
                                       use_triton)
    return loss, GRPOStats(tok.mask.sum(), *sums.unbind(0))
