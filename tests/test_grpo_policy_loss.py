"""kernels/grpo_policy_loss.py: TRL's clipped policy loss on packed log-probs (token or sequence level) and
GRPOStats, the Triton path against the definition (shared batches and bounds: tests/grpo_kernel_cases.py)."""

import itertools

import pytest
import torch

import kernels.grpo as grpo
from kernels import grpo_policy_loss
from tests.closeness import assert_close
from tests.tolerances import reduction_atol, reduction_rtol, storage_rtol, tiny_atol
from tests.grpo_kernel_cases import (INTERPRETED, BACKENDS, LOSS_TYPES, LEVELS, STAT_NAMES, make_batch, loss_kwargs,
                                    float64_batch, _sm90, _FLOAT_TYPES, check_compiles_for_sm90)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_triton_matches_definition(loss_type, level, beta, dtype):
    batch = make_batch(41, 37, 6, s=7, seed=3)
    logp0 = grpo.linear_logprobs_reference(batch["hidden"].detach(), batch["weight"].detach(), batch["targets"],
                                           temperature=0.7)
    kw = loss_kwargs(batch, loss_type, level, beta)
    results = []
    for backend, t_dtype in (("triton", dtype), ("reference", torch.float64)):
        logp = logp0.to(t_dtype, copy=True).requires_grad_()
        kw_t = {k: (v.to(t_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in kw.items()}
        loss, stats = grpo.grpo_loss(logp, batch["old_logprobs"].to(t_dtype), batch["advantages"].to(t_dtype),
                                     batch["seq_ids"], backend=backend, **kw_t)
        (loss * 1.5).backward()
        results.append((loss.detach(), logp.grad, stats))
    (loss, grad, stats), (t_loss, t_grad, t_stats) = results
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # fp32: three chained sums over the 41 tokens (sequence log-ratio, the loss, its normaliser). fp16: the
    # inputs themselves are rounded (the truth reads the unrounded fp32 values), so a log-ratio logp - old (or
    # ref - logp) moves by u16 * (|logp| + |old| + |ref|), and ratios and KL terms by that relatively.
    n = logp0.numel()
    rtol = reduction_rtol(torch.float32, n, chain=3)
    if dtype != torch.float32:
        spread = sum(t.abs().max().item() for t in (logp0, batch["old_logprobs"], batch["ref_logprobs"]))
        rtol += 2 * storage_rtol(dtype) * (1 + spread)
    magnitude = t_grad.abs().sum().item() / 1.5  # sum over tokens of |each token's term| (ratios near 1)
    assert_close(loss, t_loss, atol=rtol * magnitude, rtol=rtol, name="loss")
    assert_close(grad, t_grad, atol=rtol * t_grad.abs().max().item(), rtol=rtol, name="grad logprobs")
    for name, o, t in zip(STAT_NAMES, stats, t_stats):
        # Sums of positive terms; a clip count may move by one token whose ratio sits within rounding of a bound.
        assert_close(o, t, atol=tiny_atol(torch.float32) + (1.0 if "clipped" in name else 0.0), rtol=rtol, name=name)
    assert stats.low_clipped > 0 and stats.high_clipped > 0, "the batch must clip on both sides"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_on_policy_and_defaults(backend):
    """old_logprobs=None is old = logprobs.detach(): ratio 1, no clipping, d loss / d logp = -c A."""
    batch = make_batch(23, 17, 4, s=4, seed=5)
    logp = batch["old_logprobs"].clone().requires_grad_()
    loss, stats = grpo.grpo_loss(logp, None, batch["advantages"], batch["seq_ids"], backend=backend)
    loss.backward()
    adv = batch["advantages"][batch["seq_ids"]]
    assert_close(loss, -adv.sum() / 23, atol=reduction_atol(torch.float32, 23, adv.abs().sum().item() / 23),
                 rtol=0.0, name="on-policy dapo loss")
    assert_close(logp.grad, -adv / 23, atol=0.0, rtol=reduction_rtol(torch.float32, 2), name="on-policy grad")
    assert stats.tokens.item() == 23 and stats.ratio_sum.item() == 23
    assert stats.low_clipped.item() == stats.high_clipped.item() == stats.kl_sum.item() == 0
    assert stats.entropy_sum.item() == 0


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float64_grpo_loss_reference(loss_type, level):
    """float64 on the reference path, every side input float64 too (at sequence level this crashed in
    index_add_): computed in float64, and its gradient is the derivative of its value (gradcheck)."""
    b = float64_batch()
    with torch.no_grad():
        logp = grpo.linear_logprobs_reference(b["hidden"], b["weight"], b["targets"])
    kw = loss_kwargs(b, loss_type, level, beta=0.1)

    def loss_of(lp):
        return grpo.grpo_loss(lp, b["old_logprobs"], b["advantages"], b["seq_ids"], backend="reference", **kw)[0]

    loss, stats = grpo.grpo_loss(logp, b["old_logprobs"], b["advantages"], b["seq_ids"], backend="reference", **kw)
    assert loss.dtype == torch.float64 and all(t.dtype == torch.float64 for t in stats)
    assert torch.autograd.gradcheck(loss_of, (logp.requires_grad_(),))


def test_stats_helpers():
    stats = grpo.GRPOStats(*(torch.tensor(x) for x in (10.0, 2.0, 3.0, 0.5, 9.0, 20.0)))
    assert stats.clip_low_fraction.item() == pytest.approx(0.2)
    assert stats.clip_high_fraction.item() == pytest.approx(0.3)
    assert stats.clip_region_fraction.item() == pytest.approx(0.5)
    assert stats.kl_mean.item() == pytest.approx(0.05) and stats.ratio_mean.item() == pytest.approx(0.9)
    assert stats.entropy_mean.item() == pytest.approx(2.0)
    assert grpo.GRPOStats.from_stacked(stats.stacked() * 2).tokens.item() == 20.0
    empty = grpo.GRPOStats(*(torch.tensor(0.0) for _ in range(6)))
    assert empty.clip_low_fraction.item() == 0.0  # no tokens: 0, not NaN


# --------------------------------------------------------------------------------------------------
# The compiled kernel: built for an H100 without one (the launches of _grpo_token_kernel, case by case)
# --------------------------------------------------------------------------------------------------


def _token_launch(logp="fp32", old="fp32", ref="fp32", iw="fp32", *, has_old, has_ref, kl, has_iw, seq, grad,
                  n=1000, kind=0, delta=False, bias_correction=False):
    """`_launch_token_terms`' launch of _grpo_token_kernel: a pointer whose flag is off is the fp32 mask."""
    args = dict(
        logp_ptr=f"*{logp}", old_ptr=f"*{old}" if has_old else "*fp32", ref_ptr=f"*{ref}" if has_ref else "*fp32",
        iw_ptr=f"*{iw}" if has_iw else "*fp32", mask_ptr="*fp32", seq_ptr="*i64", adv_ptr="*fp32", coef_ptr="*fp32",
        seq_lr_ptr="*fp32", seq_w_ptr="*fp32", dlogp_ptr="*fp32", terms_ptr="*fp32", beta="fp32", clip_low="fp32",
        clip_high="fp32", ratio_cap="fp32", sapo_pos="fp32", sapo_neg="fp32",
        **({} if n == 1 else dict(n_tokens="i32", terms_stride="i32")),
    )
    switches = dict(HAS_DELTA=delta, BIAS_CORRECTION=bias_correction, HAS_OLD=has_old, HAS_REF=has_ref, KL_IN_LOSS=kl, HAS_IW=has_iw, SEQ_LEVEL=seq, WRITE_GRAD=grad)
    constexprs = dict(**switches, LOSS_KIND=kind, BLOCK=grpo_policy_loss._TOKEN_BLOCK,
                      **(dict(n_tokens=1, terms_stride=1) if n == 1 else {}))
    flags = "-".join(k.lower() for k, on in switches.items() if on) or "none"
    dtypes = logp if len({logp, old, ref, iw}) == 1 else f"{logp}-{old}-{ref}-{iw}"
    kind_name = ("", "-cispo", "-sapo")[kind]
    return _sm90("_grpo_token_kernel", args, constexprs, aligned=n != 1,
                 name=f"token-{dtypes}-{flags}{kind_name}-n{n}")


SM90_LAUNCHES = [
    # grpo_loss / fused_linear_grpo_loss: every switch combination (KL_IN_LOSS only with HAS_REF), fp32
    # (the fused path's log-probs), then 16-bit inputs of grpo_loss and mixed ones.
    *(_token_launch(has_old=o, has_ref=r, kl=k, has_iw=w, seq=s, grad=g)
      for o, (r, k), w, s, g in itertools.product((False, True), ((False, False), (True, False), (True, True)),
                                                  (False, True), (False, True), (False, True))),
    *(_token_launch(dtype, dtype, dtype, dtype, has_old=True, has_ref=True, kl=True, has_iw=True, seq=s, grad=True)
      for dtype in _FLOAT_TYPES[1:] for s in (False, True)),
    _token_launch("fp32", "bf16", "fp16", "bf16", has_old=True, has_ref=True, kl=True, has_iw=True, seq=False,
                  grad=True),
    _token_launch("bf16", "fp32", "fp32", "fp32", has_old=True, has_ref=True, kl=False, has_iw=True, seq=True,
                  grad=False),
    _token_launch(has_old=True, has_ref=True, kl=True, has_iw=True, seq=False, grad=True, n=1),
    # TRL's newer options: cispo and sapo at both levels, delta, the bias-corrected KL.
    *(_token_launch(has_old=True, has_ref=True, kl=True, has_iw=True, seq=s, grad=True, kind=k)
      for k in (1, 2) for s in (False, True)),
    _token_launch("bf16", "bf16", "bf16", "bf16", has_old=True, has_ref=True, kl=True, has_iw=True, seq=True,
                  grad=True, delta=True),
    *(_token_launch(has_old=True, has_ref=True, kl=kl, has_iw=True, seq=False, grad=True, kind=k,
                    bias_correction=True) for k in (0, 1) for kl in (False, True)),
]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter stands in for the compiler in this process")
@pytest.mark.parametrize("kernel_name,args,constexprs,num_warps,aligned", SM90_LAUNCHES)
def test_grpo_kernels_compile_for_sm90(kernel_name, args, constexprs, num_warps, aligned):
    check_compiles_for_sm90(getattr(grpo_policy_loss, kernel_name), kernel_name, args, constexprs, num_warps, aligned)
