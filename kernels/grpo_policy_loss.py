"""The GRPO loss of packed per-token log-probs (`grpo_loss`): TRL 1.16 `GRPOTrainer._compute_loss`, the forms of
its loss types "grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", at token level (GRPO) or sequence
level (GSPO).

Batches are packed and padding-free: every per-token tensor is flat [N] (the completion tokens of all sequences
of the micro-batch, one after another); `seq_ids[N]` names each token's sequence in 0..S-1 (the tokens of a
sequence need not be contiguous); per-sequence tensors are [S]. With old_t the sampling policy's log-probs
(None: on-policy, old = logp.detach()):
    token level (GRPO):      lr_t = logp_t - old_t
    sequence level (GSPO):   lr_t = lr_s = sum_{u in s} m_u (logp_u - old_u) / max(sum_{u in s} m_u, 1)
                             (Zheng et al., 2025, arXiv:2507.18071)
    r_t = exp(lr_t),  A_t = advantages[s(t)]
    pl_t = -min(r'_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) * w_t     (w_t: importance_weights, 1;
                                                   r' = min(r, delta) with two-sided clipping, else r)
         = -sg[min(r_t, eps_high)] A_t logp_t * w_t                          ("cispo"; sg: no gradient)
         = -sigmoid(tau_t (r_t - 1)) (4 / tau_t) A_t * w_t                   ("sapo"; tau_t = sapo_temperature_pos
                                                                             when A_t > 0, else ..._neg)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                        (k3 estimator, Schulman 2020;
                                                   times r_t with use_bias_correction_kl, token level only)
    l_t  = pl_t + beta * kl_t
    loss = sum_t m_t c_s(t) l_t, the normaliser c_s by loss type, with GLOBAL counts (S_g = num_sequences or
    the local S; D_g = num_items_in_batch or the local masked token count):
        "grpo", "sapo": c_s = 1 / (max(n_s, 1) * S_g)  n_s = masked tokens of sequence s (local: a sequence lives
                                                       in one micro-batch)
        "dapo", "cispo": c_s = 1 / max(D_g, 1)         one token mean over the whole step
        "luspo":    c_s = 1 / S_g                      a sum over each sequence's tokens, averaged over sequences
        "bnpo":     c_s = 1 / max(D, 1)                D = this call's own masked token count, always (TRL's
                                                       bnpo: the micro-batch's token mean; num_items_in_batch is
                                                       not used, and the caller averages over its micro-batches)
        "dr_grpo":  c_s = 1 / (S_g * max_completion_length)
so for grpo, dapo and dr_grpo the losses of the micro-batches (and ranks) of one step sum to the loss of the whole
step (a trainer whose gradient reduction averages over ranks multiplies by the world size); bnpo's are averaged
(TRL divides each by its gradient accumulation steps). Fully-masked sequences add 0.
Gradient (clipping makes pl flat in r where TRL flags a token as clipped):
    g_t = d pl_t / d lr_t = 0 if (r_t < 1 - eps_low and A_t < 0) or (r_t > 1 + eps_high and A_t > 0)
                               or (r_t > delta and A_t < 0)   (delta > 1 + eps_high is required)
                            else -A_t r_t w_t
          cispo: d pl_t / d logp_t = -min(r_t, eps_high) A_t w_t (at either level: the ratio is a constant)
          sapo:  g_t = -4 A_t r_t s_t (1 - s_t) w_t, s_t = sigmoid(tau_t (r_t - 1))
          bias-corrected KL: d (beta kl_t r_t) / d logp_t = beta r_t (1 - exp(ref_t - logp_t) + kl_t)
    token level:     d loss / d logp_t = m_t c_s (g_t + beta (1 - exp(ref_t - logp_t)))
    sequence level:  d loss / d logp_u = m_u c_s (-A_s r_s wbar_s [unless clipped] + beta (1 - exp(ref_u - logp_u)))
                     wbar_s = sum_{t in s} m_t w_t / max(n_s, 1)
Gradients flow to logprobs only; old / ref log-probs, advantages and importance weights are constants.
Log-ratios are not clamped before exp, as in TRL: r overflows fp32 only past log-ratio 88, a run that has
diverged, and then the loss should read inf rather than a clamped number. Per-sequence sums (sequence-level
log-ratios, importance weights) use `index_add_`, whose adds are atomic and in no fixed order on CUDA (not
bitwise reproducible run to run at sequence level; token counts are exact).
Clip statistics: TRL's for the clipped types; for cispo the high count is TRL's cispo_clip_ratio numerator
(r > eps_high and A > 0) and the low count 0; sapo clips nothing (both 0).
Entropy bonus (TRL's entropy_coef): loss - entropy_coef * sum_t m_t H_t / max(sum_t m_t, 1), the entropies given
here (`entropies`, the gradient flows into them) or computed and differentiated inside the fused loss's chunk loop
(d H / d x = -p (log p + H) / T).
Not supported (TRL options; kernels/trl_compat.py refuses them by name): the loss type "vespo"; the adaptive
entropy controller; use_bias_correction_kl at sequence level; delta <= 1 + epsilon_high. TRL's
top_entropy_quantile and off_policy_mask_threshold enter as importance weights (kernels/trl_compat.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.dispatch import all_interpreted, launching, use_triton
from kernels.grpo_inputs import (
    LossInputs,
    LossOptions,
    check_loss_inputs,
    check_logprobs,
    check_values,
    compute_dtype,
    loss_options,
)

# Tokens per program (a power of two). Untuned: no GPU has run this kernel yet.
_TOKEN_BLOCK = 1024
# The per-token terms buffer [5, N] holds, by row: 0 the loss term m c l, then what GRPOStats sums:
# 1 low-clipped, 2 high-clipped, 3 KL, 4 ratio (each times the mask).


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _grpo_token_kernel(
    # Pointers, per token [n_tokens]
    logp_ptr,  # current log-probs, fp16 / bf16 / fp32
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
    ratio_cap,  # delta (HAS_DELTA), or eps_high (LOSS_KIND 1, cispo)
    sapo_pos,  # sapo temperatures (LOSS_KIND 2)
    sapo_neg,
    # Compile-time switches
    LOSS_KIND: tl.constexpr,  # 0 clipped surrogate, 1 cispo, 2 sapo
    HAS_DELTA: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr,
    HAS_IW: tl.constexpr,
    SEQ_LEVEL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-token policy loss, KL, stats terms and d loss / d logp: the module docstring's formulas."""
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
    # 2. The policy term and its gradient d pl / d lr (cispo: d pl / d logp), by loss kind.
    if LOSS_KIND == 1:  # cispo: a clipped, constant coefficient on logp
        cr = tl.minimum(ratio, ratio_cap)
        loss = -cr * adv * logp * w
        low = ratio != ratio  # TRL counts no low clipping for cispo (False, NaN aside)
        high = (ratio > ratio_cap) & (adv > 0.0)
        grad = -cr * adv * w
    elif LOSS_KIND == 2:  # sapo: a soft gate instead of clipping
        tau = tl.where(adv > 0.0, sapo_pos, sapo_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -gate * (4.0 / tau) * adv * w
        low = ratio != ratio
        high = ratio != ratio
        grad = -4.0 * adv * ratio * gate * (1.0 - gate) * grad_w
    else:  # clipped surrogate; flat in the ratio exactly where TRL counts a token as clipped (or delta caps it)
        clipped_ratio = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        capped = ratio
        if HAS_DELTA:
            capped = tl.minimum(ratio, ratio_cap)
        loss = -tl.minimum(capped * adv, clipped_ratio * adv) * w
        low = (ratio < clip_low) & (adv < 0.0)
        high = (ratio > clip_high) & (adv > 0.0)
        flat = low | high
        if HAS_DELTA:
            flat = flat | ((ratio > ratio_cap) & (adv < 0.0))
        grad = tl.where(flat, 0.0, -adv * ratio) * grad_w
    # 3. KL to the reference policy (k3): in the loss when beta > 0, in the stats whenever given; times the
    #    (token) ratio with the bias correction.
    kl = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_REF:
        delta = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32) - logp
        e = tl.exp(delta)
        kl = e - delta - 1.0
        if BIAS_CORRECTION:
            if KL_IN_LOSS:
                loss += beta * kl * ratio
                grad += beta * ratio * ((1.0 - e) + kl)
            kl = kl * ratio
        elif KL_IN_LOSS:
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


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: the definition, through autograd (the spec for every path)
# ----------------------------------------------------------------------------------------------------


class GRPOStats(NamedTuple):
    """Detached scalars (fp32; float64 on the float64 reference path) over the masked tokens of one call: sums
    and counts, so that a caller can add them over micro-batches and all-reduce them (`stacked()` /
    `from_stacked()`) before dividing.

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
        """All six as one [6] tensor (one all-reduce)."""
        return torch.stack(tuple(self))

    @classmethod
    def from_stacked(cls, stacked: torch.Tensor) -> "GRPOStats":
        return cls(*stacked.unbind(0))


def grpo_loss_reference(
    logprobs, old_logprobs, advantages, seq_ids, *, mask=None, ref_logprobs=None, beta=0.0, epsilon_low=0.2,
    epsilon_high=0.2, loss_type="dapo", importance_sampling_level="token", max_completion_length=None,
    num_items_in_batch=None, num_sequences=None, importance_weights=None, delta=None, use_bias_correction_kl=False,
    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, entropy_coef=0.0, entropies=None,
):
    """The definition, TRL's formulas on packed tensors through autograd; same arguments and result as
    `grpo_loss` (module docstring), computed in fp32 (float64 for float64 log-probs)."""
    opts = loss_options(beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level, max_completion_length,
                        1.0, delta, use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg, entropy_coef)
    inputs = LossInputs(old_logprobs, advantages, seq_ids, mask, ref_logprobs, importance_weights,
                        num_items_in_batch, num_sequences)
    check_logprobs("grpo_loss_reference", logprobs, "logprobs", triton=False)
    check_values(check_loss_inputs("grpo_loss_reference", logprobs.shape[0], logprobs.device, inputs, opts,
                                   triton=False))
    return with_entropy_bonus(*loss_definition(logprobs, inputs, opts), entropies, inputs.mask, opts)


def with_entropy_bonus(loss, stats, entropies, mask, opts):
    """(loss - entropy_coef * masked token mean of `entropies`, stats with entropy_sum) through autograd: TRL's
    entropy bonus on given entropies [N] (the fused loss computes it inside its chunk loop instead)."""
    if not opts.entropy_coef:
        return loss, stats
    if not isinstance(entropies, torch.Tensor) or entropies.dim() != 1 or not entropies.dtype.is_floating_point:
        raise ValueError("entropy_coef != 0 needs entropies, a floating [N] tensor of the tokens' entropies")
    h = entropies.to(loss.dtype)
    m = torch.ones_like(h) if mask is None else mask.detach().to(loss.dtype)
    if m.shape != h.shape:
        raise ValueError(f"entropies must have N = {m.shape[0]} entries (one per token), got {h.shape[0]}")
    total = (h * m).sum()
    return loss - opts.entropy_coef * total / m.sum().clamp(min=1), stats._replace(entropy_sum=total.detach())


def _device_scalar(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype).reshape(())
    return torch.tensor(float(value), dtype=dtype, device=device)


def global_counts(inputs: LossInputs, n_seqs, m, loss_type: str):
    """(S_g, D_g): the step's global sequence and masked-token counts (local when not given; D_g always local for
    bnpo), 0-d tensors in m's dtype clamped to >= 1 (no host sync when the caller passes tensors)."""
    s = n_seqs if inputs.num_sequences is None else inputs.num_sequences
    local_items = inputs.num_items_in_batch is None or loss_type == "bnpo"
    d = m.sum() if local_items else inputs.num_items_in_batch
    return tuple(_device_scalar(x, m.device, m.dtype).clamp(min=1) for x in (s, d))


def loss_definition(logprobs, inputs: LossInputs, opts: LossOptions):
    """The loss and stats through autograd, in the compute dtype of `logprobs` (checked inputs)."""
    n_seqs, device, dtype = inputs.advantages.shape[0], logprobs.device, compute_dtype(logprobs)
    seq = inputs.seq_ids.long()
    const = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    logp = logprobs.to(dtype)
    old = logp.detach() if inputs.old_logprobs is None else const(inputs.old_logprobs)
    m = torch.ones_like(logp) if inputs.mask is None else const(inputs.mask)
    per_seq = lambda x: torch.zeros(n_seqs, dtype=dtype, device=device).index_add(0, seq, x)  # noqa: E731
    count = per_seq(m)
    log_ratio = logp - old
    if opts.level == "sequence":
        log_ratio = (per_seq(log_ratio * m) / count.clamp(min=1))[seq]
    ratio = torch.exp(log_ratio)
    adv = const(inputs.advantages)[seq]
    never = torch.zeros_like(ratio, dtype=torch.bool)
    if opts.loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=opts.epsilon_high).detach() * adv * logp
        low, high = never, (ratio > opts.epsilon_high) & (adv > 0)
    elif opts.loss_type == "sapo":
        tau = torch.where(adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        low, high = never, never
    else:
        clipped = torch.clamp(ratio, 1 - opts.epsilon_low, 1 + opts.epsilon_high)
        capped = ratio if opts.delta is None else torch.clamp(ratio, max=opts.delta)
        per_token = -torch.min(capped * adv, clipped * adv)
        low = (ratio < 1 - opts.epsilon_low) & (adv < 0)
        high = (ratio > 1 + opts.epsilon_high) & (adv > 0)
    if inputs.importance_weights is not None:
        per_token = per_token * const(inputs.importance_weights)
    kl = torch.zeros_like(logp)
    if inputs.ref_logprobs is not None:
        delta = const(inputs.ref_logprobs) - logp
        kl = torch.exp(delta) - delta - 1
        if opts.use_bias_correction_kl:
            kl = kl * ratio
        if opts.beta != 0.0:
            per_token = per_token + opts.beta * kl
    n_seq_global, n_items = global_counts(inputs, n_seqs, m, opts.loss_type)
    if opts.loss_type in ("grpo", "sapo"):
        loss = (per_seq(per_token * m) / count.clamp(min=1)).sum() / n_seq_global
    elif opts.loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (n_seq_global * opts.max_completion_length)
    elif opts.loss_type == "luspo":
        loss = (per_token * m).sum() / n_seq_global
    else:
        loss = (per_token * m).sum() / n_items
    sums = [m.sum(), (low * m).sum(), (high * m).sum(), (kl * m).sum(), (ratio * m).sum(), m.new_zeros(())]
    return loss, GRPOStats(*(t.detach() for t in sums))


# ----------------------------------------------------------------------------------------------------
# The per-token inputs of the kernel paths, the PyTorch twin of `_grpo_token_kernel` and its launcher
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenInputs:
    """The constant per-token ([N]) and per-sequence ([S]) tensors of the kernel paths, contiguous; mask, adv,
    coef and count in the compute dtype (fp32; float64 on the float64 reference path)."""

    old: torch.Tensor | None  # the caller's float dtype
    ref: torch.Tensor | None
    iw: torch.Tensor | None
    mask: torch.Tensor  # 0 / 1
    seq: torch.Tensor  # int64
    adv: torch.Tensor  # [S]
    coef: torch.Tensor  # [S]: the normaliser c_s
    count: torch.Tensor  # [S]: masked tokens per sequence
    ent_coef: torch.Tensor | None = None  # [N]: d loss / d H_t of the entropy bonus, -entropy_coef m_t / max(D, 1)

    def rows(self, rows: slice) -> "TokenInputs":
        cut = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(self, old=cut(self.old), ref=cut(self.ref), iw=cut(self.iw), mask=self.mask[rows],
                       seq=self.seq[rows], ent_coef=cut(self.ent_coef))


def token_inputs(n, device, inputs: LossInputs, opts: LossOptions, dtype) -> TokenInputs:
    const = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731
    mask = inputs.mask
    m = torch.ones(n, dtype=dtype, device=device) if mask is None else mask.detach().to(dtype).contiguous()
    seq = inputs.seq_ids.detach().long().contiguous()
    n_seqs = inputs.advantages.shape[0]
    count = torch.zeros(n_seqs, dtype=dtype, device=device).index_add_(0, seq, m)
    n_seq_global, n_items = global_counts(inputs, n_seqs, m, opts.loss_type)
    if opts.loss_type in ("grpo", "sapo"):
        coef = 1.0 / (count.clamp(min=1) * n_seq_global)
    elif opts.loss_type == "dr_grpo":
        coef = (1.0 / (n_seq_global * opts.max_completion_length)).expand(n_seqs).contiguous()
    elif opts.loss_type == "luspo":
        coef = (1.0 / n_seq_global).expand(n_seqs).contiguous()
    else:
        coef = (1.0 / n_items).expand(n_seqs).contiguous()
    ent_coef = -opts.entropy_coef * m / m.sum().clamp(min=1) if opts.entropy_coef else None
    return TokenInputs(const(inputs.old_logprobs), const(inputs.ref_logprobs), const(inputs.importance_weights),
                       m, seq, inputs.advantages.detach().to(dtype).contiguous(), coef, count, ent_coef)


def sequence_inputs(logp, tok: TokenInputs):
    """GSPO: per-sequence log-ratio lr_s (masked mean) and mean importance weight wbar_s (None without weights),
    in the compute dtype of `tok`."""
    n_seqs, dtype = tok.adv.shape[0], tok.adv.dtype
    per_seq = lambda x: torch.zeros(n_seqs, dtype=dtype, device=logp.device).index_add_(  # noqa: E731
        0, tok.seq, x * tok.mask) / tok.count.clamp(min=1)
    seq_lr = per_seq(logp.to(dtype) - tok.old.to(dtype)) if tok.old is not None else torch.zeros_like(tok.adv)
    seq_w = per_seq(tok.iw.to(dtype)) if tok.iw is not None else None
    return seq_lr, seq_w


def _torch_token_terms(logp, tok, seq_lr, seq_w, opts, write_grad):
    """Same outputs as `_launch_token_terms`, in PyTorch in tok's compute dtype (the chunked reference path)."""
    dtype = tok.adv.dtype
    logp = logp.to(dtype)
    m, adv, coef = tok.mask, tok.adv[tok.seq], tok.coef[tok.seq]
    w = None if tok.iw is None else tok.iw.to(dtype)
    if opts.level == "sequence":
        lr = seq_lr[tok.seq]
        grad_w = None if seq_w is None else seq_w[tok.seq]
    else:
        lr = logp - tok.old.to(dtype) if tok.old is not None else torch.zeros_like(logp)
        grad_w = w
    ratio = torch.exp(lr)
    never = torch.zeros_like(ratio, dtype=torch.bool)
    if opts.loss_type == "cispo":
        cr = ratio.clamp(max=opts.epsilon_high)
        loss, grad = -cr * adv * logp, -cr * adv
        low, high = never, (ratio > opts.epsilon_high) & (adv > 0)
        grad_w = w  # the coefficient multiplies each token's own logp, at either level
    elif opts.loss_type == "sapo":
        tau = torch.where(adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg)
        gate = torch.sigmoid(tau * (ratio - 1))
        loss, grad = -gate * (4 / tau) * adv, -4 * adv * ratio * gate * (1 - gate)
        low, high = never, never
    else:
        clipped = ratio.clamp(1 - opts.epsilon_low, 1 + opts.epsilon_high)
        capped = ratio if opts.delta is None else ratio.clamp(max=opts.delta)
        loss = -torch.minimum(capped * adv, clipped * adv)
        low = (ratio < 1 - opts.epsilon_low) & (adv < 0)
        high = (ratio > 1 + opts.epsilon_high) & (adv > 0)
        flat = low | high if opts.delta is None else low | high | ((ratio > opts.delta) & (adv < 0))
        grad = torch.where(flat, 0.0, -adv * ratio)
    if w is not None:
        loss = loss * w
    if grad_w is not None:
        grad = grad * grad_w
    kl = torch.zeros_like(logp)
    if tok.ref is not None:
        delta = tok.ref.to(dtype) - logp
        e = torch.exp(delta)
        kl = e - delta - 1
        if opts.use_bias_correction_kl:
            if opts.beta != 0.0:
                loss = loss + opts.beta * kl * ratio
                grad = grad + opts.beta * ratio * ((1 - e) + kl)
            kl = kl * ratio
        elif opts.beta != 0.0:
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
    if launching():  # not inside the memory planner's simulation (kernels.dispatch)
        _grpo_token_kernel[(triton.cdiv(n, _TOKEN_BLOCK),)](
            logp.contiguous(), either(tok.old), either(tok.ref), either(tok.iw), tok.mask, tok.seq,
            tok.adv, tok.coef, either(seq_lr), either(seq_w),
            either(dlogp), terms,
            n, terms.stride(0),
            opts.beta, 1.0 - opts.epsilon_low, 1.0 + opts.epsilon_high,
            opts.epsilon_high if opts.loss_type == "cispo" else (opts.delta or 0.0),
            opts.sapo_temperature_pos, opts.sapo_temperature_neg,
            LOSS_KIND={"cispo": 1, "sapo": 2}.get(opts.loss_type, 0), HAS_DELTA=opts.delta is not None,
            BIAS_CORRECTION=opts.use_bias_correction_kl,
            HAS_OLD=tok.old is not None, HAS_REF=tok.ref is not None, KL_IN_LOSS=tok.ref is not None and opts.beta != 0,
            HAS_IW=tok.iw is not None, SEQ_LEVEL=seq_level, WRITE_GRAD=write_grad, BLOCK=_TOKEN_BLOCK,
        )
    return dlogp, terms


def token_terms(logp, tok, seq_lr, seq_w, opts, write_grad, use_triton):
    """(d loss / d logp [n] or None, terms [5, n]) of these tokens, by the Triton kernel or its PyTorch twin."""
    fn = _launch_token_terms if use_triton else _torch_token_terms
    return fn(logp, tok, seq_lr, seq_w, opts, write_grad)


# ----------------------------------------------------------------------------------------------------
# autograd Function and public function
# ----------------------------------------------------------------------------------------------------


def scaled(grad, scale, dtype):
    """grad * scale, multiplied in grad's precision (the accumulators) and rounded once into dtype."""
    return None if grad is None else torch.mul(grad, scale, out=torch.empty_like(grad, dtype=dtype))


class _GRPOLoss(torch.autograd.Function):
    """GRPO loss on given log-probs (Triton path): d loss / d logp written by the token kernel in the forward."""

    @staticmethod
    def forward(ctx, logprobs, tok, opts, write_grad):
        logp = logprobs.detach()
        seq_lr, seq_w = sequence_inputs(logp, tok) if opts.level == "sequence" else (None, None)
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
        return scaled(dlogp, grad_loss, ctx.dtype), None, None, None


# Interpreted or compiled is fixed at import (kernels.dispatch): this module's kernel and tl.max / tl.sum.
KERNELS_INTERPRETED = all_interpreted(_grpo_token_kernel)


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    return use_triton(backend, device, KERNELS_INTERPRETED, "kernels.grpo_policy_loss", dtype)


def grpo_loss(logprobs, old_logprobs, advantages, seq_ids, *, mask=None, ref_logprobs=None, beta=0.0,
              epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", importance_sampling_level="token",
              max_completion_length=None, num_items_in_batch=None, num_sequences=None, importance_weights=None,
              delta=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
              entropy_coef=0.0, entropies=None, backend="auto"):
    """The GRPO loss of packed per-token log-probs (module docstring): TRL 1.16's `_compute_loss`.

    Args:
        logprobs: [N] current log-probs of the sampled tokens (gets the gradient).
        old_logprobs: [N] log-probs under the policy that sampled (None: on-policy, ratio 1).
        advantages: [S] one per sequence; seq_ids: [N] int in [0, S), each token's sequence.
        mask: [N] bool or 0 / 1: tokens that count (None: all).
        ref_logprobs: [N] reference-policy log-probs (needed when beta > 0; gives stats.kl_sum when given).
        beta: KL coefficient >= 0. epsilon_low / epsilon_high: clip range [1 - eps_low, 1 + eps_high].
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" | "luspo" | "cispo" | "sapo" (module docstring).
        importance_sampling_level: "token" | "sequence" (GSPO).
        max_completion_length: L_max, needed by "dr_grpo".
        num_items_in_batch: the step's global masked-token count ("dapo"; default: local count; "bnpo" always
            uses the local count, as TRL does).
        num_sequences: the step's global sequence count ("grpo", "dr_grpo"; default: local S).
            Both may be numbers or one-element tensors (no host sync).
        importance_weights: [N] truncated importance-sampling weights (vLLM vs trainer), multiplying the
            policy term before the KL term is added (TRL's importance_sampling_ratio).
        delta: None, or two-sided clipping's upper bound on the ratio (> 1 + epsilon_high; clipped types).
        use_bias_correction_kl: the KL term times the ratio (token level).
        sapo_temperature_pos / sapo_temperature_neg: SAPO's gate temperatures for A > 0 / A <= 0.
        entropy_coef, entropies: TRL's entropy bonus, loss - entropy_coef * sum_t m_t H_t / max(sum_t m_t, 1), with
            entropies [N] the tokens' entropies (the gradient flows into them); entropies needed when entropy_coef.
        backend: "auto" | "triton" | "reference" (the autograd definition).

    Dtypes: the policy of every kernel function (the `kernels` package docstring), for every float input;
    float64 end to end when `logprobs` is float64 (other inputs are converted to the log-probs' compute dtype).

    Returns (loss, GRPOStats with entropy_sum 0): fp32 (float64 for float64 log-probs). Raises ValueError naming
    the argument. Value checks (seq_ids in range, mask 0 / 1) run on CPU tensors only: no host sync on an
    accelerator (kernels/grpo_inputs.py).
    """
    opts = loss_options(beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level, max_completion_length,
                        1.0, delta, use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg, entropy_coef)
    inputs = LossInputs(old_logprobs, advantages, seq_ids, mask, ref_logprobs, importance_weights,
                        num_items_in_batch, num_sequences)
    triton_path = _use_triton(backend, logprobs.device, logprobs.dtype)
    check_logprobs("grpo_loss", logprobs, "logprobs", triton_path)
    n, device = logprobs.shape[0], logprobs.device
    check_values(check_loss_inputs("grpo_loss", n, device, inputs, opts, triton_path))
    if not triton_path:
        return with_entropy_bonus(*loss_definition(logprobs, inputs, opts), entropies, mask, opts)
    tok = token_inputs(n, device, inputs, opts, torch.float32)
    write_grad = torch.is_grad_enabled() and logprobs.requires_grad
    loss, sums = _GRPOLoss.apply(logprobs, tok, opts, write_grad)
    return with_entropy_bonus(loss, GRPOStats(tok.mask.sum(), *sums.unbind(0), sums.new_zeros(())), entropies, mask,
                              opts)
