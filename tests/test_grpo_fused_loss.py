"""kernels/grpo_fused_loss.py: log-probs and the GRPO loss in one chunked pass, every loss type x level x beta,
both paths against an fp64 truth (shared batches and bounds: tests/grpo_kernel_cases.py)."""

import itertools
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.grpo as grpo
from kernels import grpo_fused_loss
from tests.closeness import assert_close
from tests.tolerances import reduction_atol
from tests.conftest import REPO
from tests.grpo_kernel_cases import (BACKENDS, LOSS_TYPES, LEVELS, STAT_NAMES, cuda_only, make_batch, loss_kwargs,
                                    run_fused, check_fused_against_truth, rounding_bounds, float64_batch)


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


@pytest.mark.triton
def test_backend_dispatch(monkeypatch):
    batch = make_batch(8, 11, 4, s=2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not grpo_fused_loss._use_triton("auto", batch["hidden"].device)
    assert grpo_fused_loss._use_triton("triton", batch["hidden"].device)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert grpo_fused_loss._use_triton("auto", batch["hidden"].device)
    assert not grpo_fused_loss._use_triton("reference", batch["hidden"].device)


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
