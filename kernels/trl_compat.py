"""TRL 1.16's GRPO loss options over fastmath's GRPO kernels: which are computed, how, and which are refused.

`grpo_loss_kwargs(config)` reads a TRL `GRPOConfig` (or anything with its attribute names) and returns the keyword
arguments of `grpo_loss` / `fused_linear_grpo_loss`, plus those of `policy_term_weights`; an option fastmath does
not compute raises one ValueError naming it. `TRL_OPTIONS` lists every loss option (docs/kernels.md's compatibility
table is generated from it).

Two of TRL's masks are per-token factors on the policy term only (TRL multiplies `per_token_loss` by them before
the vLLM importance-sampling ratio and before adding the KL term), which is exactly where fastmath's
`importance_weights` act; `policy_term_weights` builds them, detached, from the log-probs and entropies:
    off_policy_mask_threshold  (DeepSeek-V3.2's off-policy sequence mask) keep sequence s unless A_s < 0 and
                               mean_{t in s} m_t (sampling_t - logp_t) > threshold (NaN terms count 0)
    top_entropy_quantile q     keep token t when H_t >= quantile_{1 - q} of the masked tokens' entropies (TRL
                               takes the quantile over every rank's tokens; here over the tokens given)
For the fused loss, the log-probs and entropies come from one no-grad `fused_linear_logprobs(...,
return_entropy=True)` pass first (2NdV FLOPs more).

`trl_clip_metrics` gives TRL's logged clip metrics beside GRPOStats' token-weighted counts: at sequence level TRL
averages the clipped flags over sequences (not tokens), and it logs the min / max over sequences of each
sequence's clipped-token fraction.
"""
from __future__ import annotations

import torch

from kernels.grpo_inputs import LOSS_TYPES

# TRL GRPOConfig loss option -> ("computed" | "refused", how). The docs/kernels.md table comes from here.
TRL_OPTIONS = {
    "loss_type": ("computed", ", ".join(LOSS_TYPES) + "; vespo refused"),
    "beta": ("computed", "k3 KL to ref_logprobs"),
    "epsilon": ("computed", "epsilon_low"),
    "epsilon_high": ("computed", "epsilon_high (cispo: the ratio cap)"),
    "delta": ("computed", "must exceed 1 + epsilon_high; no effect on cispo / sapo, as in TRL"),
    "importance_sampling_level": ("computed", "token, sequence (GSPO)"),
    "max_completion_length": ("computed", "dr_grpo's normaliser"),
    "temperature": ("computed", "fused loss: logits / T"),
    "sapo_temperature_pos": ("computed", ""),
    "sapo_temperature_neg": ("computed", ""),
    "use_bias_correction_kl": ("computed", "token level; refused at sequence level"),
    "vllm_importance_sampling_correction": ("computed", "pass the ratio as importance_weights"),
    "top_entropy_quantile": ("computed", "policy_term_weights -> importance_weights"),
    "off_policy_mask_threshold": ("computed", "policy_term_weights -> importance_weights"),
    "use_vllm": ("computed", "with vllm_importance_sampling_correction: the ratio as importance_weights"),
    "steps_per_generation": ("accepted", "dapo / cispo: num_items_in_batch carries the step's token count"),
    "router_aux_loss_coef": ("accepted", "a MoE router loss the caller adds outside the GRPO loss"),
    "entropy_coef": ("computed", "the entropy bonus, its gradient through the entropy fused into the chunk loop; "
                                 "refused with top_entropy_quantile < 1"),
    "use_adaptive_entropy": ("refused", "the adaptive entropy controller (trainer state across steps)"),
    "entropy_coef_min": ("refused", "the adaptive entropy bonus"),
    "entropy_coef_max": ("refused", "the adaptive entropy bonus"),
    "entropy_coef_delta": ("refused", "the adaptive entropy bonus"),
    "entropy_target": ("refused", "the adaptive entropy bonus"),
    "vespo_k_pos": ("refused", "vespo only"),
    "vespo_lambda_pos": ("refused", "vespo only"),
    "vespo_k_neg": ("refused", "vespo only"),
    "vespo_lambda_neg": ("refused", "vespo only"),
}


def grpo_loss_kwargs(config) -> tuple[dict, dict]:
    """(loss kwargs for grpo_loss / fused_linear_grpo_loss, kwargs for policy_term_weights) of a TRL GRPOConfig;
    ValueError naming the first option fastmath does not compute."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    if get("loss_type") == "vespo":
        raise ValueError("TRL option loss_type='vespo' is not supported by fastmath's GRPO kernels")
    if get("use_adaptive_entropy", False):
        raise ValueError("TRL option use_adaptive_entropy (the adaptive entropy controller) is not supported by "
                         "fastmath's GRPO kernels")
    if get("entropy_coef", 0.0) and get("top_entropy_quantile", 1.0) < 1.0:
        raise ValueError("TRL options entropy_coef with top_entropy_quantile < 1 (a bonus over the high-entropy "
                         "tokens only) are not supported together by fastmath's GRPO kernels")
    epsilon = get("epsilon", 0.2)
    loss = dict(
        beta=get("beta", 0.0), epsilon_low=epsilon,
        epsilon_high=epsilon if get("epsilon_high") is None else get("epsilon_high"),
        loss_type=get("loss_type", "dapo"), importance_sampling_level=get("importance_sampling_level", "token"),
        max_completion_length=get("max_completion_length"), delta=get("delta"),
        use_bias_correction_kl=get("use_bias_correction_kl", False),
        sapo_temperature_pos=get("sapo_temperature_pos", 1.0), sapo_temperature_neg=get("sapo_temperature_neg", 1.05),
        entropy_coef=get("entropy_coef", 0.0),
    )
    weights = dict(top_entropy_quantile=get("top_entropy_quantile", 1.0),
                   off_policy_mask_threshold=get("off_policy_mask_threshold"))
    return loss, weights


@torch.no_grad()
def policy_term_weights(advantages, seq_ids, mask=None, *, importance_weights=None, logprobs=None,
                        sampling_logprobs=None, off_policy_mask_threshold=None, entropies=None,
                        top_entropy_quantile=1.0):
    """Per-token [N] factors on the policy term (module docstring), times `importance_weights` when given; pass
    the result as `importance_weights`. None when no factor applies."""
    n = seq_ids.shape[0]
    m = torch.ones(n, dtype=torch.bool, device=seq_ids.device) if mask is None else mask.bool()
    seq = seq_ids.long()
    weights = None if importance_weights is None else importance_weights.detach().float()
    if off_policy_mask_threshold is not None:
        if logprobs is None or sampling_logprobs is None:
            raise ValueError("off_policy_mask_threshold needs logprobs and sampling_logprobs (old or vLLM's)")
        kl = torch.nan_to_num(sampling_logprobs.float() - logprobs.detach().float(), nan=0.0) * m
        n_seqs = advantages.shape[0]
        seq_kl = torch.zeros(n_seqs, device=kl.device).index_add_(0, seq, kl)
        count = torch.zeros(n_seqs, device=kl.device).index_add_(0, seq, m.float()).clamp(min=1.0)
        keep = ((advantages >= 0) | (seq_kl / count <= off_policy_mask_threshold)).float()[seq]
        weights = keep if weights is None else weights * keep
    if top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs the tokens' entropies")
        local = entropies.detach().float()[m]
        if local.numel() == 0:
            high = torch.zeros(n, dtype=torch.float32, device=seq_ids.device)
        else:
            threshold = torch.quantile(local, 1.0 - top_entropy_quantile)
            high = ((entropies.detach().float() * m >= threshold) & m).float()
        weights = high if weights is None else weights * high
    return weights


@torch.no_grad()
def trl_clip_metrics(logprobs, old_logprobs, advantages, seq_ids, mask=None, *, epsilon_low=0.2,
                     epsilon_high=0.2, importance_sampling_level="token", delta=None):
    """TRL's logged clip metrics of the clipped loss types: clip_ratio/low_mean, high_mean, region_mean (token
    level: over masked tokens; sequence level: over sequences, every sequence counted once), low_min, high_max
    (min / max over sequences of each sequence's clipped-token fraction; NaN for a fully masked sequence, skipped
    as TRL's nanmin / nanmax skip it). Floats (host values)."""
    n_seqs = advantages.shape[0]
    seq = seq_ids.long()
    m = (torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)).double()
    lr = (logprobs.detach() - old_logprobs).double()
    per_seq = lambda x: torch.zeros(n_seqs, dtype=torch.float64, device=x.device).index_add_(0, seq, x)  # noqa: E731
    count = per_seq(m)
    adv = advantages.double()
    if importance_sampling_level == "sequence":
        ratio = torch.exp(per_seq(lr * m) / count.clamp(min=1.0))
        a = adv
    else:
        ratio, a = torch.exp(lr), adv[seq]
    if delta is not None:
        ratio = ratio.clamp(max=delta)  # TRL flags the delta-capped ratio
    low = ((ratio < 1 - epsilon_low) & (a < 0)).double()
    high = ((ratio > 1 + epsilon_high) & (a > 0)).double()
    out = {}
    if importance_sampling_level == "sequence":
        for name, flags in (("low", low), ("high", high), ("region", torch.maximum(low, high))):
            out[f"clip_ratio/{name}_mean"] = (flags.sum() / max(n_seqs, 1)).item()
        seq_low, seq_high = low, high
    else:
        tokens = m.sum().clamp(min=1.0)
        for name, flags in (("low", low), ("high", high), ("region", torch.maximum(low, high))):
            out[f"clip_ratio/{name}_mean"] = ((flags * m).sum() / tokens).item()
        seq_low, seq_high = per_seq(low * m) / count, per_seq(high * m) / count
    seq_low, seq_high = seq_low[~seq_low.isnan()], seq_high[~seq_high.isnan()]
    out["clip_ratio/low_min"] = seq_low.min().item() if seq_low.numel() else float("nan")
    out["clip_ratio/high_max"] = seq_high.max().item() if seq_high.numel() else float("nan")
    return out
