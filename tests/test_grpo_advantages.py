"""kernels/grpo_advantages.py: group advantages (GRPO / Dr. GRPO scales), the batch std from sums all-reduced over
ranks, both paths against the formula (shared batches and bounds: tests/grpo_kernel_cases.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.grpo as grpo
from kernels import grpo_advantages
from tests.closeness import assert_close
from tests.tolerances import reduction_atol, reduction_rtol
from tests.grpo_kernel_cases import (INTERPRETED, BACKENDS, advantages_formula, check_advantages, _sm90, _FLOAT_TYPES,
                                    check_compiles_for_sm90)


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


# --------------------------------------------------------------------------------------------------
# The compiled kernel: built for an H100 without one (the launches of group_advantages, case by case)
# --------------------------------------------------------------------------------------------------


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
]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter stands in for the compiler in this process")
@pytest.mark.parametrize("kernel_name,args,constexprs,num_warps,aligned", SM90_LAUNCHES)
def test_grpo_kernels_compile_for_sm90(kernel_name, args, constexprs, num_warps, aligned):
    check_compiles_for_sm90(getattr(grpo_advantages, kernel_name), kernel_name, args, constexprs, num_warps, aligned)
