"""kernels.grpo against TRL 1.16 itself: `grpo_loss` on packed tokens equals `GRPOTrainer._compute_loss` on the
same padded batch (loss, gradient and logged metrics), for every loss type both kernels share and both
importance-sampling levels; `group_advantages` equals TRL's advantage formula.

`_compute_loss` is called as the real unbound method with a stand-in `self` (the attributes it reads, an
identity accelerator, and a `_get_per_token_logps_and_entropies` that returns the given log-probs), so what is
compared is TRL's own loss code, not a transcription of it.
"""

import itertools
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import kernels.grpo as grpo
import kernels.trl_compat as trl_compat
from tests.closeness import assert_close
from tests.tolerances import reduction_atol, reduction_rtol, tiny_atol

pytest.importorskip("trl", reason="trl (a dev extra: pip install -e '.[dev]') is the baseline these tests compare to")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

LENGTHS = [9, 4, 7, 1, 6, 8]  # completion lengths; row 5 is fully masked by the tool mask
T_MAX = 12  # max_completion_length (padded width 9)


class IdentityAccelerator:
    """One process: reduce / gather are the identity."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    gather_for_metrics = gather


def padded_batch(seed=0):
    """TRL's padded [B, T] inputs: log-probs drifted from the old ones (clipping on both sides), a tool mask that
    hides a few tokens and all of row 5, advantages of both signs, truncated IS ratios."""
    gen = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS)
    completion_mask = (torch.arange(t) < torch.tensor(LENGTHS)[:, None]).long()
    tool_mask = (torch.rand(b, t, generator=gen) > 0.15).long()
    tool_mask[5] = 0
    logps = -torch.rand(b, t, generator=gen) * 3
    shift = torch.tensor([0.35, -0.35, 0.0, 0.0, 0.35, -0.35])[:, None]  # sequence-level clipping too
    return dict(
        logps=logps,
        entropies=torch.rand(b, t, generator=gen) * 2,
        old=logps + 0.3 * torch.randn(b, t, generator=gen) - shift,
        ref=logps + 0.2 * torch.randn(b, t, generator=gen),
        advantages=torch.randn(b, generator=gen).abs() * torch.tensor([1.0, -1.0] * 3),
        iw=(0.75 + 0.5 * torch.rand(b, t, generator=gen)),
        completion_mask=completion_mask,
        tool_mask=tool_mask,
    )


def trl_loss(batch, loss_type, level, beta, with_iw, eps=(0.2, 0.28), accumulation=1, top_entropy_quantile=1.0,
             off_policy_mask_threshold=None, entropy_coef=0.0, **options):
    """TRL's `_compute_loss` on the padded batch as one of `accumulation` micro-batches of a step: (loss,
    d loss / d logps [B, T], logged metrics)."""
    logps = batch["logps"].clone().requires_grad_()
    b, t = logps.shape
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, batch["entropies"], None),
        aux_loss_enabled=False, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1],
        args=SimpleNamespace(**{**dict(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=1.0,
                                        sapo_temperature_neg=1.05), **options}, steps_per_generation=1),
        use_vllm=with_iw, vllm_importance_sampling_correction=with_iw, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation, max_completion_length=T_MAX,
        accelerator=IdentityAccelerator(),
        _metrics={"train": defaultdict(list)}, _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
    )
    stand_in.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, stand_in)
    mask = batch["completion_mask"] * batch["tool_mask"]
    inputs = dict(
        prompt_ids=torch.zeros(b, 3, dtype=torch.long), prompt_mask=torch.ones(b, 3, dtype=torch.long),
        completion_ids=torch.zeros(b, t, dtype=torch.long), completion_mask=batch["completion_mask"],
        tool_mask=batch["tool_mask"], advantages=batch["advantages"], old_per_token_logps=batch["old"],
        ref_per_token_logps=batch["ref"], num_items_in_batch=mask.sum().float(),
        importance_sampling_ratio=batch["iw"],
    )
    loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    loss.backward()
    return loss.detach(), logps.grad, stand_in._metrics["train"]


def packed(batch):
    """The same batch packed padding-free: the completion tokens of every row, row after row."""
    real = batch["completion_mask"].bool()
    rows = torch.arange(real.shape[0])[:, None].expand_as(real)
    return dict(
        logprobs=batch["logps"][real], old_logprobs=batch["old"][real], ref_logprobs=batch["ref"][real],
        importance_weights=batch["iw"][real], mask=batch["tool_mask"][real].bool(), seq_ids=rows[real],
        advantages=batch["advantages"],
    ), real


CASES = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"], [0.0, 0.04], [False, True]))
# The reference path (the definition) in every combination; the Triton path with every option on.
BACKEND_CASES = [("reference", *c) for c in CASES] + [
    pytest.param("triton", *c, marks=pytest.mark.triton) for c in CASES if c[2] and c[3]
]


@pytest.mark.parametrize("backend,loss_type,level,beta,with_iw", BACKEND_CASES)
def test_grpo_loss_equals_trl(backend, loss_type, level, beta, with_iw):
    batch = padded_batch()
    trl_value, trl_grad, metrics = trl_loss(batch, loss_type, level, beta, with_iw)
    p, real = packed(batch)
    logprobs = p.pop("logprobs").clone().requires_grad_()
    old = p.pop("old_logprobs")
    if not with_iw:
        p.pop("importance_weights")
    loss, stats = grpo.grpo_loss(
        logprobs, old, p.pop("advantages"), p.pop("seq_ids"), beta=beta, loss_type=loss_type,
        importance_sampling_level=level, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=T_MAX,
        num_items_in_batch=p["mask"].sum(), backend=backend, **p,
    )
    loss.backward()
    # Two fp32 evaluations of at most three chained sums over the batch's tokens (sequence log-ratio, the loss,
    # its normaliser); the loss's terms are each token's coefficient times a ratio near 1, i.e. its gradient.
    # A ratio is exp(logp - old) (or of a sequence mean of such terms, or ref - logp for the KL): exp turns the
    # absolute rounding of its argument, up to u (|logp| + |old|) per term, into a relative error of the ratio.
    n = int(real.sum())
    spread = max(t.abs().max().item() for t in (logprobs.detach(), old, batch["ref"][real]))
    rtol = reduction_rtol(torch.float32, n, chain=3) * (1 + 2 * spread)
    magnitude = logprobs.grad.abs().sum().item() + abs(trl_value.item())
    assert_close(loss.detach(), trl_value, atol=rtol * magnitude, rtol=0.0, name=f"loss vs TRL ({loss_type}, {level})")
    # A token's gradient is its policy term plus its KL term, of opposite signs where they cancel: the rounding
    # stays relative to the terms, which the largest gradient entry bounds.
    assert_close(logprobs.grad, trl_grad[real], atol=rtol * trl_grad.abs().max().item(), rtol=rtol,
                 name="d loss / d logprobs vs TRL")
    assert trl_grad[~real].abs().max() == 0
    if beta:
        assert_close(stats.kl_mean, torch.tensor(metrics["kl"][0]), atol=tiny_atol(torch.float32), rtol=rtol,
                     name="kl metric")
    if level == "token":  # TRL counts sequence-level clipping per sequence, GRPOStats per token (token-weighted)
        assert stats.low_clipped > 0 and stats.high_clipped > 0
        for ours, key in ((stats.clip_low_fraction, "clip_ratio/low_mean"),
                          (stats.clip_high_fraction, "clip_ratio/high_mean"),
                          (stats.clip_region_fraction, "clip_ratio/region_mean")):
            assert_close(ours, torch.tensor(metrics[key][0]), atol=tiny_atol(torch.float32), rtol=rtol, name=key)


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_micro_batches_equal_trl_accumulation(backend, loss_type):
    """A step of two micro-batches of 3 completions (unequal token counts) through TRL's `_compute_loss` with
    gradient accumulation 2 equals `grpo_loss` on the same two packed micro-batches combined as fastmath's update
    combines them: bnpo = each micro-batch's own token mean (the global token count passed is not used), weighted
    1 / (micro-batches of the step), the seed's normaliser; grpo = per-sequence means over the step's sequences."""
    batch = padded_batch()
    mask_total = (batch["completion_mask"] * batch["tool_mask"]).sum()
    trl_total, ours_total = torch.zeros(()), torch.zeros(())
    trl_grads, our_grads, reals = [], [], []
    for rows in (slice(0, 3), slice(3, 6)):
        part = {key: value[rows] for key, value in batch.items()}
        value, grad, _ = trl_loss(part, loss_type, "token", 0.04, True, accumulation=2)
        p, real = packed(part)
        logprobs = p.pop("logprobs").clone().requires_grad_()
        loss, _ = grpo.grpo_loss(logprobs, p.pop("old_logprobs"), p.pop("advantages"), p.pop("seq_ids"), beta=0.04,
                                 loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=T_MAX,
                                 num_items_in_batch=mask_total, num_sequences=6, backend=backend, **p)
        share = 0.5 if loss_type == "bnpo" else 1.0  # grpo_stage.update_policy: 1 / the step's real rows
        (loss * share).backward()
        trl_total, ours_total = trl_total + value, ours_total + loss.detach() * share
        trl_grads.append(grad[real])
        our_grads.append(logprobs.grad)
        reals.append(int(real.sum()))
    rtol = reduction_rtol(torch.float32, max(reals), chain=3)
    magnitude = sum(g.abs().sum().item() for g in our_grads) + abs(trl_total.item())
    assert_close(ours_total, trl_total, atol=rtol * magnitude, rtol=0.0, name=f"step loss vs TRL ({loss_type})")
    assert_close(torch.cat(our_grads), torch.cat(trl_grads), atol=tiny_atol(torch.float32), rtol=rtol,
                 name=f"d loss / d logprobs vs TRL ({loss_type})")
    if loss_type == "bnpo":  # the name does not hide a global token mean: dapo over the same step differs
        p, _ = packed(batch)
        dapo, _ = grpo.grpo_loss(p.pop("logprobs"), p.pop("old_logprobs"), p.pop("advantages"), p.pop("seq_ids"),
                                 beta=0.04, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, **p)
        assert abs(dapo.item() - ours_total.item()) > 100 * rtol * magnitude


def trl_advantages(rewards, group_size, scale):
    """TRL 1.16 `_generate_and_score_completions` ("sum_then_normalize", one reward function), with TRL's nanstd;
    unscorable (NaN) completions get advantage 0 afterwards, as there."""
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0) if group_size > 1 \
            else torch.zeros_like(rewards)
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.where(rewards.isnan(), 0.0, advantages)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_group_advantages_equal_trl(backend, scale):
    gen = torch.Generator().manual_seed(1)
    for rewards, group_size in (
        (torch.randn(6 * 8, generator=gen), 8),
        ((torch.rand(16 * 4, generator=gen) > 0.5).float(), 4),  # 0 / 1 accuracy: all-equal groups
        (torch.tensor([1.0, float("nan"), 0.0, 2.0, 0.5, 0.5, float("nan"), 1.5]), 4),
    ):
        ours = grpo.group_advantages(rewards, group_size, scale=scale, backend=backend)
        # Mean, std and advantage: three chained fp32 sums over a group (the batch for batch scaling) of rewards
        # at most max |r|, then a division by std + 1e-4 (at least 1e-4).
        valid = rewards[~rewards.isnan()]
        n = valid.numel() if scale == "batch" else group_size
        atol = reduction_atol(torch.float32, n, 2 * valid.abs().max().item(), chain=3)
        groups = rewards.double().view(-1, group_size)
        stds = torch.stack([g[~g.isnan()].std() for g in groups if (~g.isnan()).sum() > 1])
        denom = {"group": stds[stds > 0].min().item() if (stds > 0).any() else 1.0,
                 "batch": valid.double().std().item(), "none": 1.0}[scale]
        atol = atol / (denom + 1e-4)
        assert_close(ours.advantages, trl_advantages(rewards, group_size, scale), atol=atol,
                     rtol=reduction_rtol(torch.float32, n, chain=3), name=f"advantages vs TRL ({scale}, G={group_size})")


# TRL 1.16's newer options: the loss types luspo, cispo, sapo; two-sided clipping (delta); the bias-corrected KL.
# Each (loss_type, level, options, eps); both betas, with the vLLM importance-sampling ratios.
OPTION_CASES = [
    ("luspo", "token", {}, (0.2, 0.28)),
    ("luspo", "sequence", {}, (0.2, 0.28)),
    ("cispo", "token", {}, (0.2, 1.1)),
    ("cispo", "sequence", {}, (0.2, 1.1)),
    ("sapo", "token", dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05), (0.2, 0.28)),
    ("sapo", "sequence", dict(sapo_temperature_pos=0.7, sapo_temperature_neg=2.0), (0.2, 0.28)),
    ("grpo", "token", dict(delta=1.35), (0.2, 0.28)),
    ("dapo", "sequence", dict(delta=1.3), (0.2, 0.28)),
    ("dapo", "token", dict(use_bias_correction_kl=True), (0.2, 0.28)),
    ("cispo", "token", dict(use_bias_correction_kl=True), (0.2, 1.1)),
]
OPTION_BACKEND_CASES = [("reference", *c, beta) for c in OPTION_CASES for beta in (0.0, 0.04)] + [
    pytest.param("triton", *c, 0.04, marks=pytest.mark.triton) for c in OPTION_CASES]


@pytest.mark.parametrize("backend,loss_type,level,options,eps,beta", OPTION_BACKEND_CASES)
def test_newer_trl_options_equal_trl(backend, loss_type, level, options, eps, beta):
    batch = padded_batch(seed=2)
    trl_value, trl_grad, metrics = trl_loss(batch, loss_type, level, beta, True, eps=eps, **options)
    p, real = packed(batch)
    logprobs = p.pop("logprobs").clone().requires_grad_()
    loss, stats = grpo.grpo_loss(
        logprobs, p.pop("old_logprobs"), p.pop("advantages"), p.pop("seq_ids"), beta=beta, loss_type=loss_type,
        importance_sampling_level=level, epsilon_low=eps[0], epsilon_high=eps[1], max_completion_length=T_MAX,
        num_items_in_batch=p["mask"].sum(), backend=backend, **options, **p,
    )
    loss.backward()
    n = int(real.sum())
    spread = max(t.abs().max().item() for t in (logprobs.detach(), batch["old"][real], batch["ref"][real]))
    rtol = reduction_rtol(torch.float32, n, chain=3) * (1 + 2 * spread)
    magnitude = (logprobs.grad.abs().sum().item() + abs(trl_value.item())) * (1 + spread)  # cispo: A r logp terms
    assert_close(loss.detach(), trl_value, atol=rtol * magnitude, rtol=0.0, name=f"loss vs TRL ({loss_type}, {level})")
    assert_close(logprobs.grad, trl_grad[real], atol=rtol * trl_grad.abs().max().item(), rtol=rtol,
                 name="d loss / d logprobs vs TRL")
    assert trl_grad[~real].abs().max() == 0
    if beta:
        assert_close(stats.kl_mean, torch.tensor(metrics["kl"][0]), atol=tiny_atol(torch.float32), rtol=rtol,
                     name="kl metric")
    if level == "token" and loss_type == "cispo":
        assert stats.high_clipped > 0
        assert_close(stats.clip_high_fraction, torch.tensor(metrics["cispo_clip_ratio"][0]),
                     atol=tiny_atol(torch.float32), rtol=rtol, name="cispo_clip_ratio")
    elif level == "token" and loss_type != "sapo":
        assert_close(stats.clip_region_fraction, torch.tensor(metrics["clip_ratio/region_mean"][0]),
                     atol=tiny_atol(torch.float32), rtol=rtol, name="clip_ratio/region_mean")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("quantile,threshold", [(0.6, None), (1.0, 0.05), (0.8, 0.02)])
def test_entropy_and_off_policy_masks_equal_trl(quantile, threshold, level):
    """top_entropy_quantile and off_policy_mask_threshold through `policy_term_weights` (the entropies and the
    current log-probs read first, as a fused caller would from a no-grad fused_linear_logprobs pass)."""
    batch = padded_batch(seed=3)
    trl_value, trl_grad, _ = trl_loss(batch, "grpo", level, 0.04, True, top_entropy_quantile=quantile,
                                      off_policy_mask_threshold=threshold)
    p, real = packed(batch)
    logprobs = p.pop("logprobs").clone().requires_grad_()
    weights = trl_compat.policy_term_weights(
        p["advantages"], p["seq_ids"], p["mask"], importance_weights=p.pop("importance_weights"), logprobs=logprobs,
        sampling_logprobs=p["old_logprobs"], off_policy_mask_threshold=threshold, entropies=batch["entropies"][real],
        top_entropy_quantile=quantile)
    assert weights is not None and (weights == 0).any()
    loss, _ = grpo.grpo_loss(logprobs, p.pop("old_logprobs"), p.pop("advantages"), p.pop("seq_ids"), beta=0.04,
                             loss_type="grpo", importance_sampling_level=level, epsilon_low=0.2, epsilon_high=0.28,
                             importance_weights=weights, **p)
    loss.backward()
    rtol = reduction_rtol(torch.float32, int(real.sum()), chain=3) * 10
    assert_close(loss.detach(), trl_value, atol=rtol * (1 + abs(trl_value.item())), rtol=0.0, name="loss vs TRL")
    assert_close(logprobs.grad, trl_grad[real], atol=rtol * trl_grad.abs().max().item(), rtol=rtol,
                 name="d loss / d logprobs vs TRL")


@pytest.mark.parametrize("level,delta", [("token", None), ("sequence", None), ("token", 1.3)])
def test_clip_metrics_equal_trl(level, delta):
    """TRL's per-sequence clip metrics (sequence level: over sequences; min / max of per-sequence fractions)."""
    batch = padded_batch()
    _, _, metrics = trl_loss(batch, "dapo", level, 0.0, True, **({} if delta is None else dict(delta=delta)))
    p, _ = packed(batch)
    ours = trl_compat.trl_clip_metrics(p["logprobs"], p["old_logprobs"], p["advantages"], p["seq_ids"], p["mask"],
                                       epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level, delta=delta)
    for key, value in ours.items():  # counts divided once: TRL's division rounds to fp32
        assert value == pytest.approx(metrics[key][0], rel=2 * torch.finfo(torch.float32).eps, abs=1e-15), key
    if level == "sequence":  # the per-sequence mean is not the token-weighted one here
        _, stats = grpo.grpo_loss(p["logprobs"], p["old_logprobs"], p["advantages"], p["seq_ids"], mask=p["mask"],
                                  importance_sampling_level=level, epsilon_low=0.2, epsilon_high=0.28)
        assert stats.clip_region_fraction.item() != pytest.approx(ours["clip_ratio/region_mean"])


def test_grpo_config_maps_or_is_refused_by_name():
    from trl import GRPOConfig

    config = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, loss_type="sapo", beta=0.02, epsilon=0.1, epsilon_high=0.3,
                        sapo_temperature_neg=1.5, top_entropy_quantile=0.5, max_completion_length=T_MAX)
    loss, weights = trl_compat.grpo_loss_kwargs(config)
    assert loss["loss_type"] == "sapo" and loss["epsilon_low"] == 0.1 and loss["epsilon_high"] == 0.3
    assert loss["sapo_temperature_neg"] == 1.5 and weights["top_entropy_quantile"] == 0.5
    batch = padded_batch()
    p, _ = packed(batch)
    grpo.grpo_loss(p.pop("logprobs"), p.pop("old_logprobs"), p.pop("advantages"), p.pop("seq_ids"), **loss, **p)
    for option, value in (("loss_type", "vespo"), ("entropy_coef", 0.01), ("use_adaptive_entropy", True)):
        bad = types.SimpleNamespace(**{**vars(config), option: value})
        with pytest.raises(ValueError, match=option):
            trl_compat.grpo_loss_kwargs(bad)
    for kwargs, match in ((dict(delta=1.1), "delta"), (dict(use_bias_correction_kl=True,
                                                            importance_sampling_level="sequence"), "use_bias_corr"),
                          (dict(loss_type="vespo"), "loss_type")):
        p, _ = packed(batch)
        with pytest.raises(ValueError, match=match):
            grpo.grpo_loss(p.pop("logprobs"), p.pop("old_logprobs"), p.pop("advantages"), p.pop("seq_ids"),
                           epsilon_high=0.28, **kwargs, **p)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_entropy_bonus_equals_trl(loss_type, level, backend):
    """TRL's entropy bonus (entropy_coef): loss - coef * masked token mean of H, the gradient into the entropies;
    the fused loss differentiates H itself (tests/test_grpo_fused_loss.py, against the fp64 definition)."""
    batch = padded_batch(seed=4)
    batch["entropies"] = batch["entropies"].clone().requires_grad_()
    trl_value, trl_grad, _ = trl_loss(batch, loss_type, level, 0.04, True, entropy_coef=0.05)
    p, real = packed(batch)
    logprobs = p.pop("logprobs").clone().requires_grad_()
    entropies = batch["entropies"].detach()[real].requires_grad_()
    loss, stats = grpo.grpo_loss(logprobs, p.pop("old_logprobs"), p.pop("advantages"), p.pop("seq_ids"), beta=0.04,
                                 loss_type=loss_type, importance_sampling_level=level, epsilon_low=0.2,
                                 epsilon_high=0.28, max_completion_length=T_MAX, num_items_in_batch=p["mask"].sum(),
                                 entropy_coef=0.05, entropies=entropies, backend=backend, **p)
    loss.backward()
    rtol = reduction_rtol(torch.float32, int(real.sum()), chain=3) * 10
    assert_close(loss.detach(), trl_value, atol=rtol * (1 + abs(trl_value.item())), rtol=0.0, name="loss vs TRL")
    assert_close(logprobs.grad, trl_grad[real], atol=rtol * trl_grad.abs().max().item(), rtol=rtol, name="d logp")
    assert_close(entropies.grad, batch["entropies"].grad[real], atol=tiny_atol(torch.float32), rtol=rtol,
                 name="d loss / d entropies vs TRL")
    assert entropies.grad.abs().max() > 0 and stats.entropy_sum > 0
