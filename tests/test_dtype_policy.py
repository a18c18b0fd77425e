"""The dtype policy of every public kernel function (kernels/dispatch.py), checked the same way for each.

fp16 / bf16 / fp32 run on both paths (their numerics are the kernel test files' business); float64 runs on the
reference path, computed in float64 end to end (so `torch.autograd.gradcheck` passes), and backend="auto"
sends it there; an explicit backend="triton" refuses it with one ValueError that names the function and the
argument and points to backend='reference'.
"""
import pytest
import torch

import kernels
from kernels.cross_entropy import cross_entropy

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear_inputs(n=5, v=7, d=3):
    gen = _gen()
    hidden = torch.randn(n, d, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, dtype=F64, requires_grad=True)
    return hidden, weight, torch.randint(0, v, (n,), generator=gen)


def _attention_inputs():
    gen, lens = _gen(), [3, 4]
    q, k, v = (torch.randn(sum(lens), 2, 4, generator=gen, dtype=F64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    return q, k, v, cu


def _grpo_inputs():
    hidden, weight, targets = _linear_inputs()
    seq_ids = torch.tensor([0, 0, 1, 1, 1])
    return hidden, weight, targets, seq_ids, torch.tensor([0.5, -1.0], dtype=F64)


def _calls(backend):
    """name -> (differentiable float64 inputs, function of them) for every public kernel function."""
    hidden, weight, targets = _linear_inputs()
    logits = torch.randn(5, 7, generator=_gen(1), dtype=F64, requires_grad=True)
    q, k, v, cu = _attention_inputs()
    h, w, t, seq, adv = _grpo_inputs()
    logp = torch.randn(5, generator=_gen(2), dtype=F64).clamp(max=-0.1).requires_grad_()
    old = (logp.detach() + 0.1 * torch.randn(5, generator=_gen(3), dtype=F64))
    # Fixed old log-probs: with old = None (on-policy, old = logp.detach()) the ratio is 1 at every point,
    # so finite differences see a constant while the analytic gradient is -A / N: gradcheck needs an old.
    with torch.no_grad():
        old_fused = kernels.fused_linear_logprobs(h, w, t, backend="reference") - 0.05
    return {
        "fused_linear_cross_entropy": ((hidden, weight), lambda a, b: kernels.fused_linear_cross_entropy(
            a, b, targets, chunk_size=2, backend=backend)),
        "cross_entropy": ((logits,), lambda x: cross_entropy(x, targets, backend=backend)),
        "varlen_attention": ((q, k, v), lambda a, b, c: kernels.varlen_attention(
            a, b, c, cu, cu, 4, 4, causal=True, backend=backend)),
        "group_advantages": ((), lambda: kernels.group_advantages(
            torch.tensor([1.0, 0.0, 2.0, 2.5], dtype=F64), 2, backend=backend).advantages),
        "fused_linear_logprobs": ((h, w), lambda a, b: kernels.fused_linear_logprobs(
            a, b, t, chunk_size=2, backend=backend)),
        "grpo_loss": ((logp,), lambda x: kernels.grpo_loss(
            x, old, adv, seq, importance_sampling_level="sequence", backend=backend)[0]),
        "fused_linear_grpo_loss": ((h, w), lambda a, b: kernels.fused_linear_grpo_loss(
            a, b, t, old_fused, adv, seq, chunk_size=2, importance_sampling_level="sequence", backend=backend)[0]),
    }


def test_every_public_kernel_function_is_covered():
    public = {name for name in kernels.__all__ if callable(getattr(kernels, name)) and name[0].islower()}
    # reward_sums is the trainer's helper for batch-scaled advantages (float64 sums to all-reduce), not a kernel.
    assert public - {"reward_sums"} | {"cross_entropy"} == set(_calls("reference"))


@pytest.mark.parametrize("name", sorted(_calls("reference")))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_float64_runs_in_float64_on_the_reference_path(name, backend):
    """float64 in, float64 out, and gradcheck passes: no fp32 step hides anywhere in the path."""
    inputs, fn = _calls(backend)[name]
    out = fn(*inputs)
    assert out.dtype == F64, f"{name}: float64 inputs gave {out.dtype}"
    if inputs:
        # Central differences with step h = 1e-6 err by about h^2 |f'''| / 6 + u |f| / h (u = 1.1e-16): near 1e-10
        # for these O(1) functions, so 1e-7 leaves three orders of margin, while one fp32 step anywhere makes the
        # differences err by about 6e-8 |f| / h = 0.06 and fails.
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5), name


@pytest.mark.triton
@pytest.mark.parametrize("name", sorted(_calls("triton")))
def test_the_triton_path_refuses_float64_by_name(name):
    inputs, fn = _calls("triton")[name]
    with pytest.raises(ValueError, match=rf"^{name}: \w+ has dtype float64; the Triton path accepts float16, "
                                         r"bfloat16, float32 \(float64 runs on backend='reference'\)$"):
        fn(*inputs)
