"""kernels/grpo_logprobs.py: log-probs (and entropy) of the sampled tokens under the LM head without the [N, V]
logits, both paths against an fp64 truth (shared batches and bounds: tests/grpo_kernel_cases.py)."""

import pytest
import torch

import kernels.grpo as grpo
from kernels import grpo_fused_loss, grpo_logprobs
from tests.closeness import assert_close
from tests.tolerances import reduction_atol, unit_roundoff
from tests.grpo_kernel_cases import (INTERPRETED, BACKENDS, LEVELS, cuda_only, make_batch, loss_kwargs, run_fused,
                                    assert_error_bounded, check_fused_against_truth, float64_batch, check_advantages,
                                    _sm90, _FLOAT_TYPES, check_compiles_for_sm90)


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


# --------------------------------------------------------------------------------------------------
# The compiled kernels: built for an H100 without one (the row launches, case by case)
# --------------------------------------------------------------------------------------------------


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


SM90_LAUNCHES = [
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
    check_compiles_for_sm90(getattr(grpo_logprobs, kernel_name), kernel_name, args, constexprs, num_warps, aligned)


# --------------------------------------------------------------------------------------------------
# CUDA: compiled kernels, bf16 (wrong tl.dot in the interpreter, so only here)
# --------------------------------------------------------------------------------------------------


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
