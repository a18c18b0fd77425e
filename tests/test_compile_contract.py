"""The compile-time contract of the Triton kernels (bench/compile_contract.py), checked on CPU with Triton's own
compiler: every kept config fits the per-block shared memory of sm_90 (and sm_80), and the configs kept for head
dims 64 and 128 spill no register (bf16 / fp16). A change that adds a spill or outgrows shared memory fails here,
before any GPU time is spent.

Compilation needs the real jit functions, so this file runs in the normal pass (no `triton` marker) and skips,
with the reason, in the interpreted pass. Compiling takes a few seconds per case on one core: the test compiles
the representative subset `ci_cases` (each result cached for the process); `python bench/compile_contract.py`
runs the full matrix (both targets, every mask kind and dtype).
"""
import sys

import pytest
import triton

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import kernels.attention as attention  # noqa: E402
from kernels.dispatch import all_interpreted  # noqa: E402

INTERPRETED = all_interpreted(attention._varlen_fwd_kernel.fn)
pytestmark = pytest.mark.skipif(INTERPRETED, reason="this process interprets Triton; the contract compiles")

if not INTERPRETED:
    import compile_contract as contract  # noqa: E402

    CI_CASES = contract.ci_cases()
else:
    CI_CASES = []


def _case_id(case):
    size = f"D{case.head_dim}" if case.head_dim is not None else case.variant
    return f"{case.label.replace(' ', '_')}-{size}-{case.variant}-{case.dtype}-{case.config_name().replace(' ', '_')}"


@pytest.mark.parametrize("case", CI_CASES, ids=[_case_id(c) for c in CI_CASES])
def test_kept_config_meets_the_contract(case):
    resources = contract.compile_case(case)
    assert resources.registers > 0 and resources.shared >= 0
    assert not contract.violations(case, resources), contract.violations(case, resources)


def test_every_head_dim_keeps_pipelined_configs():
    """Each kernel keeps at least one config per head dim up to 256, every one with num_stages >= 2 (cp.async /
    TMA pipelining of the K/V or Q/dO loads), and the autotuner's list is the union of them."""
    for kernel in contract.ATTENTION_KERNELS:
        union = {str(c) for c in attention._all_configs(kernel)}
        for head_dim in (8, 16, 64, 96, 128, 200, 256):
            configs = attention.configs_for(kernel, head_dim)
            assert configs, f"{kernel}: nothing kept at head dim {head_dim}"
            assert all(c.num_stages >= 2 for c in configs), f"{kernel} D={head_dim}: unpipelined config"
            assert {str(c) for c in configs} <= union


def test_pruner_keeps_the_head_dims_configs():
    """The autotuner's early_config_prune narrows the union to the launch's BLOCK_D before anything is timed."""
    for kernel, autotuned in (("forward", attention._varlen_fwd_kernel), ("dkdv", attention._varlen_bwd_dkdv_kernel),
                              ("dq", attention._varlen_bwd_dq_kernel)):  # fmt: skip
        for head_dim in (64, 128, 256):
            kept = autotuned.early_config_prune(autotuned.configs, {}, BLOCK_D=attention.block_d(head_dim))
            assert [str(c) for c in kept] == [str(c) for c in attention.configs_for(kernel, head_dim)]


def test_violations_are_detected():
    """The checker itself: a case over the shared-memory limit, or spilling at head dim 128, is reported."""
    case = CI_CASES[0]
    over = contract.Resources(shared=contract.SHARED_LIMIT[90] + 1, registers=255, spill_stores=0, spill_loads=0,
                              seconds=0.0)  # fmt: skip
    spilling = contract.Resources(shared=0, registers=255, spill_stores=8, spill_loads=8, seconds=0.0)
    assert any("shared memory" in p for p in contract.violations(case, over))
    at_128 = next(c for c in CI_CASES if c.head_dim == 128)
    at_256 = next(c for c in CI_CASES if c.head_dim == 256)
    assert any("spills" in p for p in contract.violations(at_128, spilling))
    assert not contract.violations(at_256, spilling)  # spills are allowed at 256, shared memory is not


def test_readme_table_comes_from_the_contract():
    """docs/kernels.md's compile table is what `python bench/compile_contract.py --markdown` prints for these cases."""
    readme = (REPO / "docs/kernels.md").read_text()
    if f"Compiled by Triton {triton.__version__} " not in readme:
        pytest.skip(f"docs/kernels.md's table comes from another Triton version than this one ({triton.__version__})")
    table = contract.markdown_table(CI_CASES)
    assert table in readme, "docs/kernels.md's compile table is stale: paste `python bench/compile_contract.py --markdown --ci`"
