"""What the tests of the GRPO kernels share (one test file per kernels/grpo_*.py file): the batches, the fp64
truth, the eager yardstick and the bounds a result is held to.

The definitions (`*_reference`, evaluated on fp64 copies of the inputs) are the truth; the yardstick is PyTorch
eager in the input dtype (logits in that dtype, loss math in fp32, as HF models and TRL do): each output's error
vs the truth must be at most twice eager's plus a small tolerance. That the definitions are TRL's formulas is
checked in tests/test_grpo_trl.py against TRL's own code.

Tests of the Triton path carry the `triton` marker: `make test` runs them in a second pytest pass with
TRITON_INTERPRET=1 set from the start (tests/conftest.py skips them elsewhere). The interpreter runs one
program per row in Python, so its shapes stay small (N <= 64, V <= 300, d <= 32).
"""

import pytest
import torch

import kernels.grpo as grpo
from kernels import grpo_advantages, grpo_fused_loss
from tests.closeness import assert_close
from tests.tolerances import linear_grad_magnitudes, reduction_atol, reduction_rtol, tiny_atol


INTERPRETED = grpo_advantages.KERNELS_INTERPRETED and grpo_fused_loss.KERNELS_INTERPRETED
TRITON = pytest.param("triton", marks=pytest.mark.triton)
BACKENDS = ("reference", TRITON)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
STAT_NAMES = ("tokens", "low_clipped", "high_clipped", "kl_sum", "ratio_sum", "entropy_sum")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels at "
                               "GPU-sized shapes (the interpreter checks the same code on CPU at small shapes)")


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


def float64_batch(n=13, v=7, d=3, s=4, seed=3):
    """make_batch with every floating tensor float64 (hidden and weight requiring grad)."""
    batch = {k: t.detach().double() if t.is_floating_point() else t.detach()
             for k, t in make_batch(n, v, d, s=s, seed=seed).items()}
    batch["hidden"].requires_grad_()
    batch["weight"].requires_grad_()
    return batch


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


# --------------------------------------------------------------------------------------------------
# The compiled kernels: built for an H100 without one (the launches, case by case)
# --------------------------------------------------------------------------------------------------


def _sm90(kernel_name, args, constexprs, *, num_warps=4, aligned=True, name):
    """One launch of the kernel `kernel_name` as the JIT would specialise it: `args` maps each runtime argument to
    its Triton type; `constexprs` holds the tl.constexpr parameters and any int argument equal to 1 (which the
    launcher turns into a compile-time 1). aligned: the pointers are 16-byte aligned, as fresh torch allocations are
    (the launcher then specialises them); the cases with a constexpr 1 take the unaligned form (sliced rows)."""
    return pytest.param(kernel_name, args, constexprs, num_warps, aligned, id=name)


_FLOAT_TYPES = ("fp32", "fp16", "bf16")  # float64: the reference path only


def check_compiles_for_sm90(kernel, kernel_name, args, constexprs, num_warps, aligned):
    """Triton's compiler, down to an sm_90 cubin, on CPU: types, loop-carried values, constexpr branches and
    the specialisation of ints equal to 1, which the interpreter never checks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert set(args).isdisjoint(constexprs) and set(args) | set(constexprs) == set(kernel.arg_names), (
        f"the case does not name every argument of {kernel_name} once")
    signature = {name: "constexpr" if name in constexprs else args[name] for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if aligned and signature[name].startswith("*")}
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
