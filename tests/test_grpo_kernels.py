"""kernels/grpo.py: group advantages, fused log-probs and the GRPO loss, both paths against an fp64 truth.

The definitions (`*_reference`, evaluated on fp64 copies of the inputs) are the truth; the yardstick is PyTorch
eager in the input dtype (logits in that dtype, loss math in fp32, as HF models and TRL do): each output's error
vs the truth must be at most twice eager's plus a small tolerance. That the definitions are TRL's formulas is
checked in tests/test_grpo_trl.py against TRL's own code.

Tests of the Triton path carry the `triton` marker: `make test` runs them in a second pytest pass with
TRITON_INTERPRET=1 set from the start (tests/conftest.py skips them elsewhere). The interpreter runs one
program per row in Python, so its shapes stay small (N <= 64, V <= 300, d <= 32). CUDA tests (bf16) at the end.
"""

import itertools
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
import kernels.grpo as grpo
from kernels import grpo_advantages, grpo_fused_loss, grpo_logprobs, grpo_policy_loss
from tests.closeness import assert_close
from tests.tolerances import (linear_grad_magnitudes, reduction_atol, reduction_rtol, storage_rtol,
                              tiny_atol, unit_roundoff)
from tests.conftest import REPO

INTERPRETED = grpo_advantages.KERNELS_INTERPRETED and grpo_fused_loss.KERNELS_INTERPRETED
TRITON = pytest.param("triton", marks=pytest.mark.triton)
BACKENDS = ("reference", TRITON)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
STAT_NAMES = ("tokens", "low_clipped", "high_clipped", "kl_sum", "ratio_sum", "entropy_sum")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels at "
                               "GPU-sized shapes (the interpreter checks the same code on CPU at small shapes)")


# --------------------------------------------------------------------------------------------------
# Inputs, the truth and the yardstick
# --------------------------------------------------------------------------------------------------


def make_batch(n=37, v=53, d=8, s=6, *, dtype=torch.float32, seed=0, temperature=0.7, masked_seq=2,
               mask_frac=0.15, drift=0.3, device="cpu"):
    """A packed batch: S sequences of random lengths (contiguous), hidden / weight requiring grad, old and ref
    log-probs drifted from the current ones (so clipping happens on both sides), a mask with one fully masked
    sequence, advantages of both signs and importance weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * 2.0 / d**0.5).to(dtype)
    weight = torch.randn(v, d, generator=gen).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    seq_ids = torch.sort(torch.randint(0, s, (n,), generator=gen)).values
    with torch.no_grad():
        logp = grpo.linear_logprobs_reference(hidden, weight, targets, temperature=temperature)
    # Sequence 0 (A > 0) moved up and sequence 1 (A < 0) down by 0.35 in log-ratio: both clip at sequence
    # level too, where the per-token drift averages out.
    seq_shift = torch.tensor([0.35, -0.35, 0.0, 0.0] * (s // 4 + 1))[:s] * (drift > 0)
    batch = dict(
        hidden=hidden, weight=weight, targets=targets, seq_ids=seq_ids,
        old_logprobs=logp + drift * torch.randn(n, generator=gen) - seq_shift[seq_ids],
        ref_logprobs=logp + 0.2 * torch.randn(n, generator=gen),
        # Signs alternate, so that with the drift both clipping sides occur (A > 0 high, A < 0 low).
        advantages=torch.randn(s, generator=gen).abs() * (1 - 2 * (torch.arange(s) % 2)),
        mask=(torch.rand(n, generator=gen) > mask_frac) & (seq_ids != masked_seq),
        importance_weights=0.75 + 0.5 * torch.rand(n, generator=gen),
    )
    batch = {k: t.to(device) for k, t in batch.items()}
    batch["hidden"].requires_grad_()
    batch["weight"].requires_grad_()
    return batch


def loss_kwargs(batch, loss_type="dapo", level="token", beta=0.0, iw=True, **extra):
    kw = dict(mask=batch["mask"], ref_logprobs=batch["ref_logprobs"], beta=beta, loss_type=loss_type,
              importance_sampling_level=level, max_completion_length=20,
              importance_weights=batch["importance_weights"] if iw else None)
    return {**kw, **extra}


def run_fused(fn, batch, grad_scale=1.5, **kw):
    """(loss, [d hidden, d weight], stats) of a fused loss, backpropagating grad_scale."""
    h, w = batch["hidden"], batch["weight"]
    h.grad = w.grad = None
    loss, stats = fn(h, w, batch["targets"], batch["old_logprobs"], batch["advantages"], batch["seq_ids"], **kw)
    (loss * grad_scale).backward()
    return loss.detach(), [h.grad.clone(), w.grad.clone()], stats


def eager_linear_grpo(hidden, weight, targets, old, adv, seq, *, temperature=1.0, **kw):
    """PyTorch eager the way HF + TRL do it: logits in the input dtype, log-softmax and loss in fp32."""
    logq = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=1)
    logp = logq.gather(1, targets.unsqueeze(1)).squeeze(1)
    entropy = -(logq.exp() * logq).sum(1)
    loss, stats = grpo.grpo_loss_reference(logp, old, adv, seq, entropies=entropy if kw.get("entropy_coef") else None,
                                           **kw)
    m = torch.ones_like(logp) if kw.get("mask") is None else kw["mask"].float()
    return loss, stats._replace(entropy_sum=(entropy * m).sum().detach())


def reference_results(batch, temperature, **kw):
    """(truth, eager): the definition on fp64 copies, and eager in the input dtype."""
    out = []
    for fn, dtype in ((grpo.linear_grpo_loss_reference, torch.float64), (eager_linear_grpo, None)):
        copy = {k: t.detach().to(dtype or t.dtype) if t.is_floating_point() else t for k, t in batch.items()}
        copy["hidden"].requires_grad_()
        copy["weight"].requires_grad_()
        kw_copy = {k: (copy[k] if k in copy and isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
        out.append(run_fused(lambda *a, **k: fn(*a, temperature=temperature, **k), copy, **kw_copy))
    return out


def assert_error_bounded(name, ours, truth, eager, dtype, length, floor=0.0):
    """Error vs the fp64 truth at most 2x eager's (same input dtype) + tol * max |truth| + floor, where tol is
    the bound on two fp32 summation orders of the longest reduction, `length` terms, through the four chained
    reductions of an LM-head loss (logits, log-sum-exp, the loss, the gradient matmul), or one ulp in 16-bit:
    a wrong term errs by the scale itself and fails."""
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if truth.numel() == 0:
        return
    tol = reduction_rtol(torch.float32, length, chain=4) if dtype in (torch.float32, torch.float64) else \
        torch.finfo(dtype).eps
    err = (ours.double() - truth.double()).abs()
    err_eager = (eager.double() - truth.double()).abs().max().item()
    allowed = 2 * err_eager + tol * truth.double().abs().max().item() + floor + tiny_atol(torch.float32)
    if err.max().item() > allowed:
        worst = int(err.reshape(-1).argmax())
        pytest.fail(f"{name}: max error vs fp64 {err.max().item():.3g} > allowed {allowed:.3g} (eager "
                    f"{err_eager:.3g}); worst flat index {worst}: {ours.reshape(-1)[worst].item():.6g} vs "
                    f"{truth.reshape(-1)[worst].item():.6g}")


def check_fused_against_truth(ours, batch, temperature, **kw):
    (truth, eager) = reference_results(batch, temperature, **kw)
    dtype = batch["hidden"].dtype
    length = max(*batch["hidden"].shape, batch["weight"].shape[0])
    loss, grads, stats = ours
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    # The loss can cancel between sequences of opposite advantage far below its terms, whose size sets its
    # rounding (rounding_bounds), amplified by exp of log-ratios up to |logp| + |old| (+ |ref| for the KL).
    logp = grpo.linear_logprobs_reference(batch["hidden"].detach().double(), batch["weight"].detach().double(),
                                          batch["targets"], temperature=temperature)
    spread = max((t.abs().max().item() for t in (logp, batch["old_logprobs"], kw.get("ref_logprobs"))
                  if t is not None and t.numel()), default=0.0)
    loss_floor = float(rounding_bounds(batch, kw, torch.float32, temperature=temperature)[0]) * (1 + 2 * spread)
    for name, o, t, e in zip(("loss", "grad hidden", "grad weight"), [loss, *grads], [truth[0], *truth[1]],
                             [eager[0], *eager[1]]):
        assert_error_bounded(name, o, t, e, dtype, length, floor=loss_floor if name == "loss" else 0.0)
    for name, o, t, e in zip(STAT_NAMES, stats, truth[2], eager[2]):
        assert o.dtype == torch.float32 and not o.requires_grad, name
        # Counts are exact unless a ratio sits within rounding of a clip boundary.
        assert_error_bounded(f"stats.{name}", o, t, e, dtype, length, floor=1.0 if "clipped" in name else 0.0)
    return truth


def rounding_bounds(batch, kw, dtype, grad_scale=1.5, chain=4, temperature=1.0):
    """How far two correct evaluations of run_fused's (loss, d hidden, d weight) may differ, per element, when
    they sum in different orders (another CPU's kernels, other chunk boundaries, the Triton tiles): 2 * chain *
    gamma_n * (sum of |terms|) (tests/tolerances.py), n the longest reduction (tokens, vocabulary or hidden
    size), chain the reductions in sequence (logits, log-sum-exp, the loss, the gradient matmul). The sums of
    |terms| come from the fp64 gradient of the loss with respect to the logits: |dlogits| @ |W| for d hidden,
    |dlogits|^T @ |h| for d weight, and the per-token |d loss / d logp| (each token's term is its coefficient
    times a ratio near 1) plus |loss| for the loss."""
    h, w = batch["hidden"].detach().double(), batch["weight"].detach().double()
    logits = (h @ w.T).requires_grad_()
    logq = torch.log_softmax(logits / temperature, dim=1)
    logp = logq.gather(1, batch["targets"].unsqueeze(1)).squeeze(1)
    logp.retain_grad()
    if kw.get("entropy_coef"):  # the bonus's terms: its d logits reach the magnitudes below
        kw = dict(kw, entropies=-(logq.exp() * logq).sum(1))
    f64 = {k: (t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() and k != "entropies"
               else t) for k, t in kw.items() if k != "backend"}
    old = logp.detach() if batch["old_logprobs"] is None else batch["old_logprobs"].detach().double()
    loss, _ = grpo.grpo_loss_reference(logp, old,
                                       batch["advantages"].detach().double(), batch["seq_ids"], **f64)
    (loss * grad_scale).backward()
    mag_h, mag_w = linear_grad_magnitudes(h, w, logits.grad)
    mag_loss = logp.grad.abs().sum() / grad_scale + loss.detach().abs()
    n = max(h.shape[0], w.shape[0], h.shape[1])
    return [reduction_atol(dtype, n, 1.0, chain) * m for m in (mag_loss, mag_h, mag_w)]


# --------------------------------------------------------------------------------------------------
# Group advantages
# --------------------------------------------------------------------------------------------------


def advantages_formula(rewards, group_size, scale, eps=1e-4):
    """The module docstring's formulas in fp64 with torch.mean / torch.std (no NaN rewards here)."""
    r = rewards.double().view(-1, group_size)
    mean = r.mean(1)
    std = r.std(1) if group_size > 1 and r.shape[0] else torch.zeros_like(mean)
    equal = (r == r[:, :1]).all(1)
    std = torch.where(equal, 0.0, std)
    if scale == "group":
        denom = std + eps
    elif scale == "batch":
        denom = (r.std() if r.numel() > 1 else torch.zeros(())).double() + eps
    else:
        denom = torch.ones_like(std)
    adv = torch.where(equal[:, None], 0.0, (r - mean[:, None]) / torch.as_tensor(denom).reshape(-1, 1))
    return adv.reshape(-1), mean, std, equal


def check_advantages(out, rewards, group_size, scale):
    adv, mean, std, equal = advantages_formula(rewards, group_size, scale)
    assert out.advantages.dtype == out.mean.dtype == out.std.dtype == torch.float32
    assert out.zero_variance.dtype == torch.bool
    # fp32 sums over a group (the whole batch for batch scaling) of terms at most scale_r: the mean is one
    # reduction, the std two (mean, then squared deviations), an advantage three (and a division by denom).
    scale_r = rewards.double().abs().max().item() if rewards.numel() else 0.0
    n = max(rewards.numel() if scale == "batch" else group_size, 1)
    assert_close(out.mean, mean, atol=reduction_atol(torch.float32, n, scale_r), rtol=0.0, name="mean")
    assert_close(out.std, std, atol=reduction_atol(torch.float32, n, 2 * scale_r, chain=2), rtol=0.0, name="std")
    denom = std + 1e-4 if scale == "group" else torch.ones_like(std)
    atol = (reduction_atol(torch.float32, n, 2 * scale_r, chain=3) / denom).max().item() if denom.numel() else 0.0
    assert_close(out.advantages, adv, atol=atol, rtol=reduction_rtol(torch.float32, n, chain=3), name="advantages")
    assert torch.equal(out.zero_variance, equal)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("n_groups,group_size", [(5, 8), (3, 1), (7, 3), (2, 37), (1, 5), (0, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_advantages_match_formula(backend, n_groups, group_size, scale):
    rewards = torch.randn(n_groups * group_size, generator=torch.Generator().manual_seed(group_size)) * 3 + 1
    if n_groups > 1:
        rewards[:group_size] = 0.1  # one group of identical rewards: advantage exactly 0
    out = grpo.group_advantages(rewards, group_size, scale=scale, backend=backend)
    check_advantages(out, rewards, group_size, scale)
    assert torch.equal(out.advantages.view(max(n_groups, 1), -1)[0] if n_groups > 1 else out.advantages[:0],
                       torch.zeros(group_size if n_groups > 1 else 0))


@pytest.mark.triton
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_tiles(scale, monkeypatch):
    """Groups longer than one tile (the tile shrunk to 16 rewards), many groups per tile, partial tiles."""
    monkeypatch.setattr(grpo_advantages, "_ADVANTAGE_TILE", 16)
    for n_groups, group_size in ((3, 41), (37, 3)):
        rewards = torch.rand(n_groups * group_size, generator=torch.Generator().manual_seed(n_groups))
        check_advantages(grpo.group_advantages(rewards, group_size, scale=scale, backend="triton"),
                         rewards, group_size, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_advantages_nan_rewards_and_degenerate_groups(backend):
    """NaN (unscorable) rewards: left out of the statistics (TRL's nanmean / nanstd), advantage 0. Groups of one,
    all-equal and all-NaN groups: advantage 0, never NaN, flagged zero-variance."""
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 3.0, 0.0, 5.0, 5.0, 5.0, nan, nan, nan, nan, nan, 2.0, nan, nan, nan])
    for scale in ("group", "batch", "none"):
        out = grpo.group_advantages(rewards, 4, scale=scale, backend=backend)
        for t in out[:3]:
            assert torch.isfinite(t).all()
        r = rewards.view(4, 4)
        valid = r[0][~r[0].isnan()].double()
        # Sums of at most 16 rewards of size <= 5 (tolerances as in check_advantages).
        tol = reduction_atol(torch.float32, 16, 5.0, chain=3)
        assert_close(out.mean, torch.tensor([valid.mean().item(), 5.0, 0.0, 2.0]), atol=tol, rtol=0, name="mean")
        assert_close(out.std[0], valid.std(), atol=tol, rtol=0, name="std of group 0")
        assert out.std[1:].eq(0).all()
        assert out.zero_variance.tolist() == [False, True, True, True]
        denom = {"group": valid.std() + 1e-4, "none": 1.0,
                 "batch": rewards[~rewards.isnan()].double().std() + 1e-4}[scale]
        expected = torch.zeros(16, dtype=torch.float64)
        expected[[0, 2, 3]] = (valid - valid.mean()) / denom
        assert_close(out.advantages, expected, atol=tol / denom, rtol=reduction_rtol(torch.float32, 16, chain=3),
                     name=f"advantages ({scale})")
    single = grpo.group_advantages(torch.tensor([0.3, -2.0]), 1, backend=backend)
    assert single.advantages.tolist() == [0.0, 0.0] and single.std.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.ones(6), 4), {}, "not a multiple of group_size = 4"),
        ((torch.ones(2, 3), 3), {}, "1-D"),
        ((torch.ones(6, dtype=torch.int64), 3), {}, "floating point"),
        ((torch.ones(6), 0), {}, "group_size"),
        ((torch.ones(6), 2.0), {}, "group_size"),
        ((torch.ones(6), 3), dict(scale="std"), "scale"),
        ((torch.ones(6), 3), dict(eps=-1.0), "eps"),
        ((torch.ones(6), 3), dict(backend="gpu"), "backend"),
    ],
)
def test_group_advantages_bad_inputs_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo.group_advantages(*args, **kwargs)


@settings(max_examples=30, deadline=None)
@given(n_groups=st.integers(0, 12), group_size=st.integers(1, 20), scale=st.sampled_from(["group", "batch", "none"]),
       seed=st.integers(0, 2**16), discrete=st.booleans())
def test_property_group_advantages_reference(n_groups, group_size, scale, seed, discrete):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n_groups * group_size, generator=gen)
    if discrete:  # 0 / 1 accuracy rewards: many all-equal groups
        rewards = (rewards > 0).float()
    check_advantages(grpo.group_advantages(rewards, group_size, scale=scale), rewards, group_size, scale)


@pytest.mark.triton
@settings(max_examples=8, deadline=None)
@given(n_groups=st.integers(1, 9), group_size=st.integers(1, 12), scale=st.sampled_from(["group", "batch", "none"]),
       seed=st.integers(0, 2**16))
def test_property_group_advantages_triton(n_groups, group_size, scale, seed):
    rewards = torch.randn(n_groups * group_size, generator=torch.Generator().manual_seed(seed))
    check_advantages(grpo.group_advantages(rewards, group_size, scale=scale, backend="triton"), rewards,
                     group_size, scale)


# --------------------------------------------------------------------------------------------------
# Fused log-probs
# --------------------------------------------------------------------------------------------------


def logprobs_and_grads(fn, hidden, weight, targets, **kw):
    hidden.grad = weight.grad = None
    logp, entropy = fn(hidden, weight, targets, return_entropy=True, **kw)
    (logp * torch.linspace(-1.0, 2.0, logp.shape[0], dtype=logp.dtype, device=logp.device)).sum().backward()
    return [logp.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_bytes_sets_the_rows_per_chunk(backend):
    """chunk_bytes (a logits budget) gives the chunks chunk_size names for the same budget, bit for bit, in the
    log-probs pass and the fused loss (token and sequence level); a budget that was ignored would give the one
    chunk of the default, whose d weight sums in another order."""
    batch = make_batch()
    n, v = batch["hidden"].shape[0], batch["weight"].shape[0]
    budget = 5 * v * 4 + 3  # fp32 logits: 5 rows on either path
    h, w, y = batch["hidden"], batch["weight"], batch["targets"]
    for level in LEVELS:
        kw = dict(loss_kwargs(batch, "dapo", level), backend=backend)
        whole, by_rows, by_bytes = (run_fused(grpo.fused_linear_grpo_loss, batch, **kw, **chunking)
                                    for chunking in (dict(chunk_size=n), dict(chunk_size=5), dict(chunk_bytes=budget)))
        assert torch.equal(by_bytes[0], by_rows[0]) and all(map(torch.equal, by_bytes[1], by_rows[1]))
        assert not torch.equal(by_bytes[1][1], whole[1][1])
    by_rows = logprobs_and_grads(grpo.fused_linear_logprobs, h, w, y, chunk_size=5, backend=backend)
    by_bytes = logprobs_and_grads(grpo.fused_linear_logprobs, h, w, y, chunk_bytes=budget, backend=backend)
    assert all(map(torch.equal, by_bytes, by_rows))


def eager_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=True):
    logq = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=1)
    return logq.gather(1, targets.unsqueeze(1)).squeeze(1), -(logq.exp() * logq).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("backend,n,v,d,chunk_size", [
    ("reference", 37, 53, 8, 7), ("reference", 1, 2, 3, None), ("reference", 64, 300, 32, 64),
    pytest.param("triton", 37, 53, 8, 7, marks=pytest.mark.triton),
    pytest.param("triton", 13, 300, 16, None, marks=pytest.mark.triton),
])
def test_fused_linear_logprobs_match_truth(backend, n, v, d, chunk_size, temperature, dtype):
    batch = make_batch(n, v, d, dtype=dtype, seed=n)
    h, w, y = batch["hidden"], batch["weight"], batch["targets"]
    ours = logprobs_and_grads(grpo.fused_linear_logprobs, h, w, y, temperature=temperature, chunk_size=chunk_size,
                              backend=backend)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    truth = logprobs_and_grads(grpo.linear_logprobs_reference, h64, w64, y, temperature=temperature)
    hd, wd = (t.detach().requires_grad_() for t in (h, w))
    eager = logprobs_and_grads(eager_logprobs, hd, wd, y, temperature=temperature)
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[2].dtype == ours[3].dtype == dtype
    for name, o, t, e in zip(("logprobs", "entropy", "grad hidden", "grad weight"), ours, truth, eager):
        assert_error_bounded(name, o, t, e, dtype, max(n, v, d))


@pytest.mark.triton
@pytest.mark.parametrize("v", [53, 64, 200])
def test_triton_vocab_tiles(v, monkeypatch):
    """V below, equal to and above one kernel tile (64 here), the last tile partial: the online pass (max,
    sum and entropy rescaled) across tiles, and the loss on top."""
    monkeypatch.setattr(grpo_logprobs, "_MAX_BLOCK_V", 64)
    batch = make_batch(19, v, 8, s=3, seed=v)
    batch["targets"][-1] = v - 1  # the last column, in the partial tile
    kw = loss_kwargs(batch, beta=0.05)
    ours = run_fused(grpo.fused_linear_grpo_loss, batch, temperature=0.9, backend="triton", **kw)
    check_fused_against_truth(ours, batch, 0.9, **kw)


def test_logprobs_without_entropy_and_grad():
    batch = make_batch(9, 11, 4)
    h, w, y = batch["hidden"], batch["weight"], batch["targets"]
    logp = grpo.fused_linear_logprobs(h, w, y)
    assert logp.shape == (9,) and logp.requires_grad
    with torch.no_grad():
        again, entropy = grpo.fused_linear_logprobs(h, w, y, return_entropy=True)
    assert not again.requires_grad and not entropy.requires_grad
    assert torch.equal(again, logp.detach())


def _fp16_token_mean_batch(n=256, v=6, d=4, s=8):
    """fp16 rows whose classes 2.. sit ~14 nats down (p ~ 1e-6) and are never sampled: their d weight is a sum
    of n entries coef * p with coef ~ 1/n, each below fp16's smallest subnormal (2^-24) when stored."""
    gen = torch.Generator().manual_seed(5)
    hidden = (torch.randn(n, d, generator=gen) * 0.2 + 2).half()  # a mean, so d weight does not cancel
    weight = torch.cat([torch.randn(2, d, generator=gen) * 0.3, torch.full((v - 2, d), -1.75)]).half()
    targets = torch.randint(0, 2, (n,), generator=gen)
    seq_ids = torch.arange(n) // (n // s)
    return hidden, weight, targets, seq_ids


@pytest.mark.triton
@pytest.mark.parametrize("loss", ["logprobs_mean", "grpo_dapo", "grpo_grpo_sequence"])
def test_fp16_token_mean_gradient_keeps_entries_below_fp16_range(loss):
    """fp16, a token mean (1/N in d loss / d logp): coef (onehot - p) of rare vocabulary entries is below fp16's
    subnormals at N = 16k, V = 152k; the interpreter reaches that regime at N = 256 (as the cross-entropy test
    does). The row kernels get the coefficients divided by their largest magnitude and the result is scaled
    back in fp32: d weight and d hidden against the float64 truth."""
    hidden, weight, targets, seq_ids = _fp16_token_mean_batch()
    n, v = hidden.shape[0], weight.shape[0]
    adv = torch.linspace(0.5, 1.0, int(seq_ids.max()) + 1)  # one sign: d weight does not cancel
    with torch.no_grad():  # old = the current policy (ratio 1, no clipping): g = -A
        old = grpo.linear_logprobs_reference(hidden.float(), weight.float(), targets)
    kw = dict(loss_type="dapo") if loss == "grpo_dapo" else dict(loss_type="grpo", importance_sampling_level="sequence")

    def grads(h, w, backend):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        if loss == "logprobs_mean":
            fn = grpo.fused_linear_logprobs if backend else grpo.linear_logprobs_reference
            fn(h, w, targets, **({"backend": backend} if backend else {})).mean().backward()
        else:
            fn = grpo.fused_linear_grpo_loss if backend else grpo_fused_loss.linear_grpo_loss_reference
            fn(h, w, targets, old.to(h.dtype), adv.to(h.dtype), seq_ids, **kw,
               **({"backend": backend} if backend else {}))[0].backward()
        return h.grad, w.grad

    ours = grads(hidden, weight, "triton")
    truth = grads(hidden.double(), weight.double(), None)
    logits = hidden.double() @ weight.double().T
    p = torch.softmax(logits, dim=1)
    # |d loss / d logp_t| <= max |A| / n_t per token in each case here (1/N, 1/N, 1/(n_s S) = 1/N).
    coef = 1.0 / n
    assert (coef * p[:, 2:] < 2.0**-24).all() and (truth[1][2:].abs() > 2.0**-23).all(), "not the regime"
    # Roundings: logits in fp16 move p (and log p, hence the ratio) by up to 2 u |z| each: 8 u (z_max + 1) of
    # each dlogit; each scaled dlogit stored in fp16 (relative u, absolute 2^-25 below the normal range, times
    # the factor taken out, at most 1/N here); fp32 matmuls; one rounding of each result to fp16.
    u16, floor16 = unit_roundoff(torch.float16), 2.0**-25
    dlogits = coef * (p - torch.nn.functional.one_hot(targets, v).double()).abs()
    entry = 8 * u16 * (logits.abs().amax(1, keepdim=True) + 1) * dlogits + floor16 * coef
    for name, o, t, other in (("d hidden", ours[0], truth[0], weight), ("d weight", ours[1], truth[1], hidden)):
        spread = (entry @ other.double().abs()) if name == "d hidden" else (entry.T @ other.double().abs())
        assert_close(o, t, atol=spread + 2 * u16 * t.abs() + floor16, rtol=0.0, name=f"{name} ({loss}, fp16)")


# --------------------------------------------------------------------------------------------------
# GRPO loss on given log-probs (the Triton path against the definition)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Fused GRPO loss against the truth: every loss type x level x beta, both paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_grpo_loss_matches_truth(backend, loss_type, level, beta):
    """Masked tokens, a fully masked sequence, clipping on both sides, importance weights, T = 0.7, 6 chunks."""
    batch = make_batch(seed=11)
    kw = loss_kwargs(batch, loss_type, level, beta)
    ours = run_fused(grpo.fused_linear_grpo_loss, batch, temperature=0.7, chunk_size=7, backend=backend, **kw)
    truth = check_fused_against_truth(ours, batch, 0.7, **kw)
    assert truth[2].low_clipped > 0 and truth[2].high_clipped > 0, "the batch must clip on both sides"


# TRL's newer options in the fused loss (each also held to TRL's _compute_loss in tests/test_grpo_trl.py), and
# the entropy bonus, whose gradient through the entropy the chunk loop computes (d H / d x = -p (log p + H) / T).
NEWER_OPTIONS = [
    ("cispo", "token", 0.04, dict(epsilon_high=1.1)),
    ("cispo", "sequence", 0.0, dict(epsilon_high=1.1)),
    ("sapo", "token", 0.04, dict(sapo_temperature_neg=1.5)),
    ("luspo", "sequence", 0.04, {}),
    ("grpo", "token", 0.04, dict(delta=1.5)),
    ("dapo", "token", 0.04, dict(use_bias_correction_kl=True)),
    ("grpo", "token", 0.04, dict(entropy_coef=0.1)),
    ("dapo", "sequence", 0.0, dict(entropy_coef=0.05)),
]


@pytest.mark.parametrize("loss_type,level,beta,extra", NEWER_OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_grpo_newer_options_match_truth(backend, loss_type, level, beta, extra):
    batch = make_batch(seed=11)
    kw = loss_kwargs(batch, loss_type, level, beta, **extra)
    ours = run_fused(grpo.fused_linear_grpo_loss, batch, temperature=0.7, chunk_size=7, backend=backend, **kw)
    check_fused_against_truth(ours, batch, 0.7, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_grpo_loss_16_bit(backend, level, dtype):
    """16-bit hidden / weight. bf16 runs in the interpreter too: these kernels have no tl.dot (the one op
    docs/design.md records as wrong there on bf16); the matmuls are torch's."""
    batch = make_batch(29, 67, 16, dtype=dtype, seed=2)
    kw = loss_kwargs(batch, "grpo", level, 0.04)
    ours = run_fused(grpo.fused_linear_grpo_loss, batch, temperature=1.0, chunk_size=8, backend=backend, **kw)
    check_fused_against_truth(ours, batch, 1.0, **kw)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_on_policy_without_options(backend, level):
    """The common on-policy call: no old / ref / mask / weights; equals old = logp.detach() given explicitly."""
    batch = make_batch(17, 23, 5, s=3, seed=4)
    with torch.no_grad():
        logp = grpo.fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], backend=backend)
    kw = dict(importance_sampling_level=level, backend=backend)
    loss, grads, stats = run_fused(grpo.fused_linear_grpo_loss, {**batch, "old_logprobs": None}, **kw)
    loss2, grads2, _ = run_fused(grpo.fused_linear_grpo_loss, {**batch, "old_logprobs": logp}, **kw)
    bounds = rounding_bounds({**batch, "old_logprobs": None}, {"importance_sampling_level": level}, torch.float32)
    for name, a, b, tol in zip(("loss", "grad hidden", "grad weight"), [loss, *grads], [loss2, *grads2], bounds):
        assert_close(a, b, atol=tol, rtol=0.0, name=name)
    assert stats.tokens.item() == 17 and stats.ratio_sum.item() == 17 and stats.entropy_sum > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_and_empty_batches(backend):
    """Everything masked: loss 0, gradients 0, no NaN, for every normaliser; an empty batch too."""
    batch = make_batch(13, 19, 4, s=3, seed=6)
    batch["mask"] = torch.zeros(13, dtype=torch.bool)
    for loss_type, level in itertools.product(LOSS_TYPES, LEVELS):
        loss, grads, stats = run_fused(grpo.fused_linear_grpo_loss, batch, backend=backend, chunk_size=5,
                                       **loss_kwargs(batch, loss_type, level, 0.1))
        for t in (loss, *grads, *stats):
            assert torch.equal(t, torch.zeros_like(t)), (loss_type, level)
    empty = make_batch(0, 19, 4, s=2, seed=6)
    for loss_type in LOSS_TYPES:
        loss, grads, stats = run_fused(grpo.fused_linear_grpo_loss, empty, backend=backend,
                                       **loss_kwargs(empty, loss_type, "sequence", 0.1))
        assert loss.item() == 0 and all(g.abs().sum() == 0 for g in grads) and stats.tokens.item() == 0
        empty_logp = torch.zeros(0, requires_grad=True)
        loss, _ = grpo.grpo_loss(empty_logp, None, torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                 loss_type=loss_type, max_completion_length=4, backend=backend)
        loss.backward()
        assert loss.item() == 0 and empty_logp.grad.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_reward_groups_flow_through(backend):
    """Rewards -> group advantages -> fused loss: identical-reward groups give advantage 0 and add nothing, a
    group of one too; no NaN anywhere."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    adv = grpo.group_advantages(rewards, 3, backend=backend).advantages
    assert adv[:3].eq(0).all() and adv[6:].eq(0).all() and adv[3:6].ne(0).all()
    batch = make_batch(40, 23, 6, s=9, seed=8)
    batch["advantages"] = adv
    kw = loss_kwargs(batch, "grpo", "token", 0.0, iw=False)
    loss, grads, _ = run_fused(grpo.fused_linear_grpo_loss, batch, backend=backend, **kw)
    assert all(torch.isfinite(t).all() for t in (loss, *grads))
    rows = torch.isin(batch["seq_ids"], torch.tensor([3, 4, 5]))
    assert grads[0][~rows].abs().max() == 0, "zero-advantage sequences carry no gradient (beta = 0)"
    single = grpo.group_advantages(torch.tensor([0.7, 0.2]), 1, backend=backend)
    assert single.advantages.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_weights(backend, level):
    """All-ones weights change nothing; constant weights k scale the policy term only (not the KL term)."""
    batch = make_batch(21, 19, 4, s=4, seed=9)
    kw = loss_kwargs(batch, "bnpo", level, 0.0, iw=False)
    base, _, _ = run_fused(grpo.fused_linear_grpo_loss, batch, backend=backend, **kw)
    ones, _, _ = run_fused(grpo.fused_linear_grpo_loss, batch, backend=backend,
                           **{**kw, "importance_weights": torch.ones(21)})
    base_tol = rounding_bounds(batch, kw, torch.float32)[0]
    assert_close(ones, base, atol=base_tol, rtol=0.0, name="weights of one")
    kl_only, _, _ = run_fused(grpo.fused_linear_grpo_loss, {**batch, "advantages": torch.zeros(4)},
                              backend=backend, **{**kw, "beta": 0.5})
    scaled, _, _ = run_fused(grpo.fused_linear_grpo_loss, batch, backend=backend,
                             **{**kw, "beta": 0.5, "importance_weights": torch.full((21,), 3.0)})
    kl_kw = {**kw, "beta": 0.5}
    tol = (rounding_bounds(batch, {**kl_kw, "importance_weights": torch.full((21,), 3.0)}, torch.float32)[0]
           + 3 * base_tol + rounding_bounds({**batch, "advantages": torch.zeros(4)}, kl_kw, torch.float32)[0])
    assert_close(scaled, 3 * base + kl_only, atol=tol, rtol=0.0, name="3 x policy + KL")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_need_not_be_contiguous(backend):
    """A permutation of the packed tokens (sequences interleaved) gives the same loss and gradients."""
    batch = make_batch(30, 29, 6, s=5, seed=10)
    kw = loss_kwargs(batch, "grpo", "sequence", 0.04)
    loss, grads, _ = run_fused(grpo.fused_linear_grpo_loss, batch, backend=backend, chunk_size=8, **kw)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    shuffled = {k: (t.detach()[perm] if k != "weight" and t.dim() and t.shape[0] == 30 else t.detach())
                for k, t in batch.items()}
    shuffled["hidden"].requires_grad_()
    shuffled["weight"].requires_grad_()
    loss2, grads2, _ = run_fused(grpo.fused_linear_grpo_loss, shuffled, backend=backend, chunk_size=8,
                                 **loss_kwargs(shuffled, "grpo", "sequence", 0.04))
    loss_tol, h_tol, w_tol = rounding_bounds(batch, kw, torch.float32)
    assert_close(loss2, loss, atol=loss_tol, rtol=0.0, name="loss")
    assert_close(grads2[0], grads[0][perm], atol=h_tol[perm], rtol=0.0, name="grad hidden")
    assert_close(grads2[1], grads[1], atol=w_tol, rtol=0.0, name="grad weight")


def split_batch(batch, seqs):
    """The micro-batch holding the sequences `seqs` (renumbered 0..len-1)."""
    rows = torch.isin(batch["seq_ids"], seqs)
    renumber = torch.full((int(batch["seq_ids"].max()) + 1,), -1, dtype=torch.long)
    renumber[seqs] = torch.arange(len(seqs))
    part = {k: (t.detach()[rows] if k not in ("weight", "advantages") else t.detach()) for k, t in batch.items()}
    part["seq_ids"], part["advantages"] = renumber[part["seq_ids"]], batch["advantages"][seqs]
    part["hidden"].requires_grad_()
    part["weight"].requires_grad_()
    return part, rows


@pytest.mark.parametrize("backend,loss_type,level", [
    # bnpo is left out: it averages the micro-batches' own token means, as TRL does (tests/test_grpo_trl.py).
    *(("reference", t, lv) for t in LOSS_TYPES if t != "bnpo" for lv in LEVELS),
    pytest.param("triton", "grpo", "sequence", marks=pytest.mark.triton),
    pytest.param("triton", "dapo", "token", marks=pytest.mark.triton),
])
def test_micro_batches_sum_to_the_whole_batch(backend, loss_type, level):
    """Two micro-batches with the global num_items_in_batch / num_sequences: losses and gradients add up to
    the whole batch's (what gradient accumulation and ranks rely on). An algebraic identity, so the reference
    path checks it in float64; the Triton path (fp32 at most, by the dtype policy) is held to the bound on two
    summation orders. The interpreted pass checks two of the combinations."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    batch = make_batch(40, 31, 6, s=6, seed=12, dtype=dtype)
    kw = loss_kwargs(batch, loss_type, level, 0.04)
    whole, (gh, gw), _ = run_fused(grpo.fused_linear_grpo_loss, batch, backend=backend, chunk_size=9, **kw)
    total, grad_w = 0.0, torch.zeros_like(gw)
    grad_h = torch.zeros_like(gh)
    n_items, n_seqs = batch["mask"].sum(), 6
    for seqs in (torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4])):
        part, rows = split_batch(batch, seqs)
        part_kw = loss_kwargs(part, loss_type, level, 0.04, num_items_in_batch=n_items, num_sequences=n_seqs)
        loss, (ph, pw), _ = run_fused(grpo.fused_linear_grpo_loss, part, backend=backend, chunk_size=9, **part_kw)
        total, grad_w, grad_h[rows] = total + loss, grad_w + pw, ph
    loss_tol, h_tol, w_tol = rounding_bounds(batch, kw, dtype)
    assert_close(total, whole, atol=loss_tol, rtol=0.0, name="sum of micro-batch losses")
    assert_close(grad_h, gh, atol=h_tol, rtol=0.0, name="grad hidden")
    assert_close(grad_w, gw, atol=w_tol, rtol=0.0, name="grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients_and_no_grad(backend):
    batch = make_batch(11, 13, 4, s=2)
    batch["weight"].requires_grad_(False)
    loss, stats = grpo.fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], None,
                                              batch["advantages"], batch["seq_ids"], backend=backend)
    loss.backward()
    assert batch["weight"].grad is None and batch["hidden"].grad is not None
    with torch.no_grad():
        again, stats2 = grpo.fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], None,
                                                    batch["advantages"], batch["seq_ids"], backend=backend,
                                                    importance_sampling_level="sequence")
    assert not again.requires_grad
    tol = rounding_bounds(batch, {"importance_sampling_level": "sequence"}, torch.float32)[0]
    assert_close(again, loss.detach(), atol=tol, rtol=0.0, name="loss under no_grad")


@pytest.mark.parametrize("level", LEVELS)
def test_reference_path_memory(level):
    """The PyTorch path holds at most two chunks of fp32 logits at a time (plus O(N) vectors and the fp32
    d-weight accumulator and its rounded copy), never the full [N, V] logits; the logits-only function too."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import PeakStorageBytes

    n, v, d, chunk = 600, 2000, 8, 100
    batch = make_batch(n, v, d, s=6, seed=1)
    inputs = [t for t in batch.values()]
    chunk_bytes, weight_bytes = chunk * v * 4, v * d * 4
    with PeakStorageBytes(inputs) as tracker:
        run_fused(grpo.fused_linear_grpo_loss, batch, chunk_size=chunk, backend="reference",
                  **loss_kwargs(batch, "grpo", level, 0.04))
    assert tracker.peak < 2 * chunk_bytes + 3 * weight_bytes + 64 * n * 4, tracker.peak / chunk_bytes
    with PeakStorageBytes(inputs) as tracker:
        logp = grpo.fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], chunk_size=chunk,
                                          backend="reference")
        logp.sum().backward()
    assert tracker.peak < 2 * chunk_bytes + 3 * weight_bytes + 64 * n * 4, tracker.peak / chunk_bytes


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


def test_public_exports():
    for name in ("group_advantages", "fused_linear_logprobs", "grpo_loss", "fused_linear_grpo_loss", "GRPOStats",
                 "GroupAdvantages"):
        assert getattr(kernels, name) is getattr(grpo, name)


# --------------------------------------------------------------------------------------------------
# Dispatch and argument checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_backend_dispatch(monkeypatch):
    batch = make_batch(8, 11, 4, s=2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not grpo_fused_loss._use_triton("auto", batch["hidden"].device)
    assert grpo_fused_loss._use_triton("triton", batch["hidden"].device)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert grpo_fused_loss._use_triton("auto", batch["hidden"].device)
    assert not grpo_fused_loss._use_triton("reference", batch["hidden"].device)


@pytest.mark.skipif(INTERPRETED, reason="kernels were imported under TRITON_INTERPRET=1")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    batch = make_batch(4, 5, 3, s=2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grpo.group_advantages(torch.ones(4), 2, backend="triton")
    with pytest.raises(RuntimeError, match="before triton and kernels.grpo_logprobs are imported"):
        grpo.fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], backend="triton")


def _bad(name, value):
    """A change to one input of the batch (applied to a detached copy)."""
    return name, value


@pytest.mark.parametrize(
    "change,kwargs,match",
    [
        (_bad("seq_ids", lambda b: torch.where(b["seq_ids"] == 0, 6, b["seq_ids"])), {},
         r"seq_ids must lie in \[0, S\) = \[0, 6\); seq_ids\[\d+\] = 6"),
        (_bad("seq_ids", lambda b: b["seq_ids"].float()), {}, "seq_ids must have an integer dtype"),
        (_bad("seq_ids", lambda b: b["seq_ids"][:-1]), {}, "seq_ids must be 1-D with N = 37"),
        (_bad("mask", lambda b: b["mask"].float() * 2), {}, r"mask must be bool or hold only 0 and 1"),
        (_bad("mask", lambda b: b["mask"][:3]), {}, "mask must be 1-D"),
        (_bad("old_logprobs", lambda b: b["old_logprobs"][:-2]), {}, "old_logprobs must have N = 37"),
        (_bad("old_logprobs", lambda b: b["old_logprobs"].long()), {}, "old_logprobs must be floating point"),
        (_bad("ref_logprobs", lambda b: b["ref_logprobs"][None]), {}, "ref_logprobs must be 1-D"),
        (_bad("advantages", lambda b: b["advantages"][:, None]), {}, "advantages must be a 1-D floating"),
        (_bad("targets", lambda b: torch.full_like(b["targets"], 53)), {}, r"targets must lie in \[0, V\)"),
        (_bad("targets", lambda b: b["targets"].float()), {}, "targets must have an integer dtype"),
        (_bad("weight", lambda b: b["weight"][:, :-1]), {}, r"weight.shape\[1\]"),
        (_bad("weight", lambda b: b["weight"].double()), {}, "weight dtype"),
        (_bad("hidden", lambda b: b["hidden"][0]), {}, "hidden must be 2-D"),
        (None, dict(loss_type="ppo"), "loss_type"),
        (None, dict(importance_sampling_level="tokens"), "importance_sampling_level"),
        (None, dict(loss_type="dr_grpo", max_completion_length=None), "needs max_completion_length"),
        (None, dict(max_completion_length=0), "max_completion_length"),
        (None, dict(beta=0.1, ref_logprobs=None), "needs ref_logprobs"),
        (None, dict(beta=-0.1), "beta"),
        (None, dict(epsilon_low=1.5), "epsilon_low"),
        (None, dict(epsilon_high=float("nan")), "epsilon_high"),
        (None, dict(num_items_in_batch=0), "num_items_in_batch"),
        (None, dict(num_sequences=torch.ones(2)), "num_sequences"),
        (None, dict(temperature=0.0), "temperature"),
        (None, dict(chunk_size=0), "chunk_size"),
        (None, dict(chunk_bytes=-1), "chunk_bytes"),
        (None, dict(chunk_size=4, chunk_bytes=2**20), "chunk_size .* or chunk_bytes"),
        (None, dict(backend="cuda"), "backend"),
    ],
)
def test_bad_inputs_raise(change, kwargs, match):
    """One ValueError naming the argument, from the fused loss and (for what it shares) from grpo_loss."""
    batch = {k: t.detach() for k, t in make_batch().items()}
    if change is not None:
        batch[change[0]] = change[1](batch)
    kw = {**loss_kwargs(batch, "dr_grpo"), **kwargs}
    with pytest.raises(ValueError, match=match):
        grpo.fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["targets"], batch["old_logprobs"],
                                    batch["advantages"], batch["seq_ids"], **kw)
    linear_only = (change is not None and change[0] in ("hidden", "weight", "targets")) or {
        "temperature", "chunk_size", "chunk_bytes"} & set(kwargs)
    if not linear_only:
        logp = torch.zeros(37)
        with pytest.raises(ValueError, match=match):
            grpo.grpo_loss(logp, batch["old_logprobs"], batch["advantages"], batch["seq_ids"], **kw)


# --------------------------------------------------------------------------------------------------
# Property tests over random shapes and options
# --------------------------------------------------------------------------------------------------

CASES = st.fixed_dictionaries({
    "n": st.integers(1, 40), "v": st.integers(2, 60), "d": st.integers(1, 12), "s": st.integers(1, 8),
    "chunk_size": st.one_of(st.none(), st.integers(1, 50)), "loss_type": st.sampled_from(LOSS_TYPES),
    "level": st.sampled_from(LEVELS), "beta": st.sampled_from([0.0, 0.1]), "iw": st.booleans(),
    "temperature": st.sampled_from([0.5, 1.0, 1.3]), "mask_frac": st.sampled_from([0.0, 0.3, 1.0]),
    "drift": st.sampled_from([0.0, 0.3, 2.0]), "seed": st.integers(0, 2**16),
})


def check_property_case(case, backend):
    c = case
    batch = make_batch(c["n"], c["v"], c["d"], c["s"], seed=c["seed"], temperature=c["temperature"],
                       mask_frac=c["mask_frac"], drift=c["drift"], masked_seq=-1)
    kw = loss_kwargs(batch, c["loss_type"], c["level"], c["beta"], iw=c["iw"])
    ours = run_fused(grpo.fused_linear_grpo_loss, batch, temperature=c["temperature"], chunk_size=c["chunk_size"],
                     backend=backend, **kw)
    check_fused_against_truth(ours, batch, c["temperature"], **kw)


@settings(max_examples=40, deadline=None)
@given(case=CASES)
def test_property_reference_path(case):
    check_property_case(case, "reference")


@pytest.mark.triton
@settings(max_examples=10, deadline=None)
@given(case=CASES)
def test_property_triton_path(case):
    check_property_case(case, "triton")


# --------------------------------------------------------------------------------------------------
# The compiled kernels: built for an H100 without one (the launches of kernels/grpo.py, case by case)
# --------------------------------------------------------------------------------------------------


def _sm90(kernel_name, args, constexprs, *, num_warps=4, aligned=True, name):
    """One launch of the kernel `kernel_name` as the JIT would specialise it: `args` maps each runtime argument to
    its Triton type; `constexprs` holds the tl.constexpr parameters and any int argument equal to 1 (which the
    launcher turns into a compile-time 1). aligned: the pointers are 16-byte aligned, as fresh torch allocations are
    (the launcher then specialises them); the cases with a constexpr 1 take the unaligned form (sliced rows)."""
    return pytest.param(kernel_name, args, constexprs, num_warps, aligned, id=name)


def _advantage_launch(rewards_dtype, n_groups, group_size, scale, std_given=False):
    """`group_advantages`' launch of _group_advantages_kernel (its tile arithmetic, copied)."""
    tile, next_power_of_2 = grpo_advantages._ADVANTAGE_TILE, grpo_advantages.triton.next_power_of_2
    block_g = min(next_power_of_2(group_size), tile)
    block_b = max(1, min(next_power_of_2(n_groups), tile // block_g))
    ints = dict(n_rewards=n_groups * group_size, n_groups=n_groups, group_size=group_size)
    args = dict(rewards_ptr=f"*{rewards_dtype}", batch_std_ptr="*fp32", adv_ptr="*fp32", mean_ptr="*fp32",
                std_ptr="*fp32", zero_var_ptr="*i8", eps="fp32", **{k: "i32" for k, v in ints.items() if v != 1})
    constexprs = dict(SCALE=grpo_advantages.SCALES.index(scale), BATCH_STD_GIVEN=std_given, BLOCK_B=block_b,
                      BLOCK_G=block_g, **{k: 1 for k, v in ints.items() if v == 1})
    return _sm90("_group_advantages_kernel", args, constexprs, aligned=1 not in ints.values(),
                 name=f"advantages-{rewards_dtype}-B{n_groups}-G{group_size}-{scale}{'-given' * std_given}")


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


def _row_launch(kernel, logits_dtype, v, entropy=None):
    """`_row_logprobs` / `_row_dlogits`' launches: n_cols = V, tile and warps from kernels.chunking.row_tile."""
    block_v, warps = grpo_logprobs.row_tile(v)
    ints = {} if v == 1 else dict(n_cols="i32", logits_row_stride="i32")
    common = dict(logits_ptr=f"*{logits_dtype}", targets_ptr="*i64", scale="fp32", **ints)
    constexprs = dict(BLOCK_V=block_v, **({} if v != 1 else dict(n_cols=1, logits_row_stride=1)))
    if kernel == "_logprob_rows_kernel":
        args = dict(common, logp_ptr="*fp32", m2_ptr="*fp32", log2_s_ptr="*fp32", entropy_ptr="*fp32")
        constexprs["ENTROPY"] = entropy
        name = f"rows-{logits_dtype}-V{v}-{'entropy' if entropy else 'no_entropy'}"
    else:
        args = dict(common, m2_ptr="*fp32", log2_s_ptr="*fp32", coef_ptr="*fp32", entropy_ptr="*fp32",
                    ent_coef_ptr="*fp32", inv_temperature="fp32")
        constexprs["ENTROPY_GRAD"] = bool(entropy)
        name = f"grad_rows-{logits_dtype}-V{v}{'-entropy_grad' if entropy else ''}"
    return _sm90(kernel, args, constexprs, num_warps=warps, aligned=v != 1, name=name)


_FLOAT_TYPES = ("fp32", "fp16", "bf16")  # float64: the reference path only
SM90_LAUNCHES = [
    # group_advantages: rewards of any float dtype, the three scales, tiles from one reward to 4096-wide.
    *(_advantage_launch("fp32", 5, 8, scale) for scale in grpo_advantages.SCALES),
    _advantage_launch("fp32", 5, 8, "batch", std_given=True),  # the step's std from all-reduced sums
    *(_advantage_launch(dtype, 5, 8, "batch") for dtype in _FLOAT_TYPES[1:]),
    *(_advantage_launch("fp32", 3, 1, scale) for scale in grpo_advantages.SCALES),  # group_size == 1: a constexpr
    _advantage_launch("fp32", 1, 1, "batch"),  # every size a constexpr 1, 1 x 1 tiles
    _advantage_launch("bf16", 1, 5, "group"),
    _advantage_launch("fp32", 2, 5000, "batch"),  # BLOCK_G = 4096, BLOCK_B = 1
    _advantage_launch("fp16", 10000, 8, "batch"),  # BLOCK_B = 512
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
    # fused_linear_logprobs / the fused losses: logits in the input dtype, each BLOCK_V / num_warps step, V = 1.
    *(_row_launch("_logprob_rows_kernel", dtype, 53, entropy) for dtype in _FLOAT_TYPES for entropy in (False, True)),
    *(_row_launch("_logprob_rows_kernel", "bf16", v, True) for v in (3000, 152064, 1)),
    *(_row_launch("_logprob_grad_rows_kernel", dtype, 53) for dtype in _FLOAT_TYPES),
    *(_row_launch("_logprob_grad_rows_kernel", "bf16", v) for v in (3000, 152064, 1)),
    *(_row_launch("_logprob_grad_rows_kernel", dtype, 53, True) for dtype in _FLOAT_TYPES),  # the entropy bonus
]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter stands in for the compiler in this process")
@pytest.mark.parametrize("kernel_name,args,constexprs,num_warps,aligned", SM90_LAUNCHES)
def test_grpo_kernels_compile_for_sm90(kernel_name, args, constexprs, num_warps, aligned):
    """Triton's compiler, down to an sm_90 cubin, on CPU: types, loop-carried values, constexpr branches and
    the specialisation of ints equal to 1, which the interpreter never checks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = next(getattr(m, kernel_name) for m in (grpo_advantages, grpo_logprobs, grpo_policy_loss)
                  if hasattr(m, kernel_name))
    assert set(args).isdisjoint(constexprs) and set(args) | set(constexprs) == set(kernel.arg_names), (
        f"the case does not name every argument of {kernel_name} once")
    signature = {name: "constexpr" if name in constexprs else args[name] for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if aligned and signature[name].startswith("*")}
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]


# --------------------------------------------------------------------------------------------------
# CUDA: compiled kernels, bf16 (wrong tl.dot in the interpreter, so only here)
# --------------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_cuda_fused_grpo_loss(loss_type, level, dtype):
    batch = make_batch(300, 1000, 64, s=12, dtype=dtype, seed=1, device="cuda")
    kw = loss_kwargs(batch, loss_type, level, 0.04)
    loss, grads, stats = run_fused(grpo.fused_linear_grpo_loss, batch, temperature=0.7, chunk_size=128, **kw)
    ours = (loss.cpu(), [g.cpu() for g in grads], grpo.GRPOStats(*(t.cpu() for t in stats)))
    cpu = {k: t.detach().cpu() for k, t in batch.items()}
    cpu["hidden"].requires_grad_()
    cpu["weight"].requires_grad_()
    check_fused_against_truth(ours, cpu, 0.7, **loss_kwargs(cpu, loss_type, level, 0.04))


@cuda_only
def test_cuda_group_advantages_and_logprobs_bf16():
    rewards = torch.randn(64 * 8, device="cuda")
    out = grpo.group_advantages(rewards, 8)
    check_advantages(grpo.GroupAdvantages(*(t.cpu() for t in out)), rewards.cpu(), 8, "group")
    batch = make_batch(257, 3000, 64, dtype=torch.bfloat16, device="cuda")
    h, w, y = batch["hidden"], batch["weight"], batch["targets"]
    ours = logprobs_and_grads(grpo.fused_linear_logprobs, h, w, y, chunk_size=100)
    truth = logprobs_and_grads(grpo.linear_logprobs_reference, *(t.detach().double().requires_grad_() for t in (h, w)),
                               y)
    eager = logprobs_and_grads(eager_logprobs, *(t.detach().requires_grad_() for t in (h, w)), y)
    for name, o, t, e in zip(("logprobs", "entropy", "grad hidden", "grad weight"), ours, truth, eager):
        assert_error_bounded(name, o, t, e, torch.bfloat16, 3000)


# --------------------------------------------------------------------------------------------------
# The dtype policy (kernels/dispatch.py), the step's batch std from all-reduced sums, value checks off the CPU
# --------------------------------------------------------------------------------------------------


def float64_batch(n=13, v=7, d=3, s=4, seed=3):
    """make_batch with every floating tensor float64 (hidden and weight requiring grad)."""
    batch = {k: t.detach().double() if t.is_floating_point() else t.detach()
             for k, t in make_batch(n, v, d, s=s, seed=seed).items()}
    batch["hidden"].requires_grad_()
    batch["weight"].requires_grad_()
    return batch


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


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float64_fused_linear_grpo_loss_reference(loss_type, level):
    """The chunked reference path in float64 end to end: equal to the unchunked definition up to float64
    rounding, and its forward-computed gradients are the derivative of its value (gradcheck)."""
    b = float64_batch(seed=5)
    kw = dict(loss_kwargs(b, loss_type, level, beta=0.1), temperature=0.7)
    args = (b["targets"], b["old_logprobs"], b["advantages"], b["seq_ids"])

    def loss_of(h, w):
        return grpo.fused_linear_grpo_loss(h, w, *args, chunk_size=4, backend="reference", **kw)[0]

    loss, stats = grpo.fused_linear_grpo_loss(b["hidden"], b["weight"], *args, chunk_size=4, backend="reference",
                                              **kw)
    truth, t_stats = grpo.linear_grpo_loss_reference(b["hidden"], b["weight"], *args, **kw)
    assert loss.dtype == torch.float64 and all(t.dtype == torch.float64 for t in stats)
    # Four chained reductions (logits over d, log-sum-exp over V, per-sequence and loss sums over N) of terms
    # bounded by 10 here (|A| r w + beta kl with ratios near 1): float64 leaves ~1e-13; a wrong term ~1e-2.
    length = max(b["hidden"].shape[0], b["weight"].shape[0])
    tol = reduction_atol(torch.float64, length, 10.0 * length, chain=4)
    for name, o, t in zip(("loss",) + STAT_NAMES, (loss, *stats), (truth, *t_stats)):
        assert_close(o.detach(), t.detach(), atol=tol, rtol=0.0, name=name)
    assert torch.autograd.gradcheck(loss_of, (b["hidden"], b["weight"]))


def test_float64_fused_linear_logprobs_reference():
    b = float64_batch(seed=7)

    def logprobs_of(h, w):
        return grpo.fused_linear_logprobs(h, w, b["targets"], temperature=0.7, chunk_size=5, backend="reference")

    logp, entropy = grpo.fused_linear_logprobs(b["hidden"], b["weight"], b["targets"], return_entropy=True,
                                               backend="reference")
    assert logp.dtype == entropy.dtype == torch.float64
    truth, t_entropy = grpo.linear_logprobs_reference(b["hidden"], b["weight"], b["targets"], return_entropy=True)
    # Two chained reductions (logits over d, log-sum-exp / entropy over V) of terms of size <= 10.
    tol = reduction_atol(torch.float64, 7, 10.0 * 7, chain=2)
    assert_close(logp.detach(), truth.detach(), atol=tol, rtol=0.0, name="logprobs")
    assert_close(entropy, t_entropy.detach(), atol=tol, rtol=0.0, name="entropy")
    assert torch.autograd.gradcheck(logprobs_of, (b["hidden"], b["weight"]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_float64_group_advantages_reference(scale):
    rewards = torch.randn(5 * 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3 + 1
    out = grpo.group_advantages(rewards, 6, scale=scale, backend="reference")
    assert all(t.dtype == torch.float64 for t in out[:3])
    adv, mean, std, _ = advantages_formula(rewards, 6, scale)
    # float64 sums of at most 30 rewards of size <= 10 (mean, std, advantage: three chained reductions).
    tol = reduction_atol(torch.float64, 30, 10.0 * 30, chain=3)
    assert_close(out.mean, mean, atol=tol, rtol=0.0, name="mean")
    assert_close(out.std, std, atol=tol, rtol=0.0, name="std")
    denom = {"group": std.min().item() + 1e-4, "batch": rewards.std().item() + 1e-4, "none": 1.0}[scale]
    assert_close(out.advantages, adv, atol=tol / denom, rtol=0.0, name="advantages")


@pytest.mark.triton
def test_float64_refused_by_the_triton_path():
    """One ValueError at the API boundary naming the function and the argument, for every GRPO function, the
    primary input or any side input."""
    b = float64_batch(9, 7, 3, s=3)
    f32 = {k: t.detach().float() if t.is_floating_point() else t for k, t in b.items()}
    logp32 = torch.zeros(9)
    cases = [
        ("group_advantages", "rewards", lambda: grpo.group_advantages(torch.ones(4, dtype=torch.float64), 2,
                                                                      backend="triton")),
        ("fused_linear_logprobs", "hidden",
         lambda: grpo.fused_linear_logprobs(b["hidden"], b["weight"], b["targets"], backend="triton")),
        ("grpo_loss", "logprobs", lambda: grpo.grpo_loss(logp32.double(), None, b["advantages"], b["seq_ids"],
                                                         backend="triton")),
        ("grpo_loss", "old_logprobs", lambda: grpo.grpo_loss(logp32, b["old_logprobs"], f32["advantages"],
                                                             b["seq_ids"], backend="triton")),
        ("grpo_loss", "advantages", lambda: grpo.grpo_loss(logp32, None, b["advantages"], b["seq_ids"],
                                                           backend="triton")),
        ("fused_linear_grpo_loss", "hidden", lambda: grpo.fused_linear_grpo_loss(
            b["hidden"], b["weight"], b["targets"], None, f32["advantages"], b["seq_ids"], backend="triton")),
        ("fused_linear_grpo_loss", "importance_weights", lambda: grpo.fused_linear_grpo_loss(
            f32["hidden"], f32["weight"], b["targets"], None, f32["advantages"], b["seq_ids"],
            importance_weights=b["importance_weights"], importance_sampling_level="sequence", backend="triton")),
    ]
    for function, argument, call in cases:
        with pytest.raises(ValueError, match=rf"^{function}: {argument} has dtype float64; the Triton path accepts "
                                             r".*\(float64 runs on backend='reference'\)$"):
            call()


def split_rewards_with_nan():
    """Rewards of 6 groups of 5 with NaN (unscorable) rewards and one all-equal group, as two ranks' halves."""
    rewards = torch.randn(30, generator=torch.Generator().manual_seed(11)) * 2 + 1
    rewards[[3, 17]] = float("nan")
    rewards[10:15] = 0.5
    return rewards, (rewards[:15], rewards[15:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_scaled_advantages_from_rank_sums(backend):
    """Each rank's reward_sums, summed (the all-reduce), give every rank the advantages of the whole step's
    batch std: the kernel with the sums equals the reference on the whole batch, and the reference with the same
    sums."""
    rewards, ranks = split_rewards_with_nan()
    sums = grpo.reward_sums(ranks[0]) + grpo.reward_sums(ranks[1])
    assert sums.dtype == torch.float64 and sums[0].item() == 28  # the two NaN rewards left out
    parts = [grpo.group_advantages(r, 5, scale="batch", batch_sums=sums, backend=backend) for r in ranks]
    whole = grpo_advantages.group_advantages_reference(rewards, 5, scale="batch")
    # fp32 reductions over the batch (28 rewards of size <= 6: mean, std, advantage), divided by std + eps.
    scale_r = rewards.nan_to_num().abs().max().item()
    denom = whole.advantages.new_tensor(rewards[~rewards.isnan()].double().std().item() + 1e-4)
    atol = reduction_atol(torch.float32, 30, 2 * scale_r, chain=3) / denom.item()
    rtol = reduction_rtol(torch.float32, 30, chain=3)
    got = torch.cat([p.advantages for p in parts])
    assert_close(got, whole.advantages, atol=atol, rtol=rtol, name="advantages vs the whole batch")
    assert torch.equal(torch.cat([p.zero_variance for p in parts]), whole.zero_variance)
    for r, p in zip(ranks, parts):
        same = grpo_advantages.group_advantages_reference(r, 5, scale="batch", batch_sums=sums)
        assert_close(p.advantages, same.advantages, atol=atol, rtol=rtol, name="advantages vs the reference")
        assert_close(p.mean, same.mean, atol=reduction_atol(torch.float32, 5, scale_r), rtol=0.0, name="mean")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale="group", batch_sums=torch.ones(3)), "needs scale='batch'"),
        (dict(scale="batch", batch_sums=torch.ones(2)), r"batch_sums must be reward_sums\(rewards\)"),
        (dict(scale="batch", batch_sums=torch.ones(3, dtype=torch.int64)), r"batch_sums must be reward_sums"),
        (dict(scale="batch", batch_sums=torch.ones(3, device="meta")), "batch_sums must be on the rewards' device"),
    ],
)
def test_group_advantages_bad_batch_sums_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo.group_advantages(torch.ones(6), 3, **kwargs)


def test_value_checks_read_only_cpu_tensors():
    """Value checks read values on the host, so they run only on CPU tensors (no device to wait for); for a
    tensor elsewhere the check is never evaluated (no host sync per micro-batch)."""
    from kernels.grpo_inputs import check_values

    def never():
        raise AssertionError("a value check was evaluated for a tensor off the CPU")

    check_values([("seq_ids", torch.empty(3, device="meta"), never, "must lie in [0, S)")])
    with pytest.raises(ValueError, match=r"^seq_ids must lie in \[0, S\); seq_ids\[1\] = 5$"):
        check_values([("seq_ids", torch.tensor([0, 5]), lambda: torch.tensor([False, True]), "must lie in [0, S)")])


@pytest.mark.triton
def test_out_of_range_target_gives_nan_logprob_in_the_kernel():
    """Off the CPU targets are not value-checked; the row kernel then reads nothing outside the row and gives a
    NaN log-prob, which reaches the loss (tested on the row kernel directly: on CPU the check runs first)."""
    logits = torch.randn(3, 11)
    targets = torch.tensor([2, 11, -1])
    logp, *_ = grpo_logprobs.row_logprobs(logits.clone(), targets, 1.0, True, use_triton=True)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    assert_close(logp[:1], torch.log_softmax(logits[:1], 1)[:, 2], atol=reduction_atol(torch.float32, 11, 10.0),
                 rtol=0.0, name="logp of the valid row")


@cuda_only
def test_cuda_grpo_paths_do_not_sync_the_host():
    """No hidden host synchronisation in the kernels' input paths on a GPU: advantages with the step's sums,
    and the fused loss forward and backward (CUDA's sync debug mode raises on any synchronising call)."""
    batch = make_batch(64, 300, 32, s=6, device="cuda")
    kw = loss_kwargs(batch, "grpo", "sequence", 0.04)
    rewards = torch.randn(40, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grpo.group_advantages(rewards, 8, scale="batch", batch_sums=grpo.reward_sums(rewards))
        loss, _ = grpo.fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["targets"],
                                              batch["old_logprobs"], batch["advantages"], batch["seq_ids"],
                                              chunk_size=16, num_items_in_batch=torch.tensor(50.0, device="cuda"),
                                              num_sequences=torch.tensor(6.0, device="cuda"), **kw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
