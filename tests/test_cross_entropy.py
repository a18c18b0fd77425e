"""kernels/cross_entropy.py: the Triton path (interpreted on CPU) and the PyTorch paths against an fp64 truth.

Triton chooses between compiling and interpreting when it decorates a function, its own `tl.max` / `tl.sum`
included, so TRITON_INTERPRET=1 must be set before triton is first imported. The tests of the Triton path
carry the `triton` marker and `make test` runs them in a second pytest pass with TRITON_INTERPRET=1 set from the
start (`-m triton`). The CUDA tests at the end use the compiled kernels and need a GPU.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels
import kernels.chunking as chunking
import kernels.cross_entropy as ce
from tests import tolerances
from tests.closeness import assert_close

INTERPRETED = ce._KERNELS_INTERPRETED
# Triton tests carry the `triton` marker; on CPU they run in the interpreted pytest pass of `make test`
# (TRITON_INTERPRET=1 from the start), and tests/conftest.py skips them, with that reason, elsewhere.
interpreted_only = pytest.mark.triton
TRITON = pytest.param("triton", marks=pytest.mark.triton)


REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("reference", TRITON)
OPTION_SETS = {
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss_scale=1e-2),
    "softcap": dict(softcap=2.5),
    "temperature": dict(temperature=0.6),
    "all": dict(label_smoothing=0.3, z_loss_scale=0.05, softcap=4.0, temperature=1.7),
}


def make_inputs(n, v, d, *, dtype=torch.float32, bias=True, ignore_frac=0.2, ignore_index=-100, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * scale / d**0.5).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(v, generator=gen).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    return hidden, weight, b, labels


def backward_weighted(loss):
    """Backpropagate a grad_output other than 1: 1.5 for scalars, fixed row weights for "none"."""
    if loss.dim() == 0:
        (loss * 1.5).backward()
    else:
        (loss * torch.linspace(-1.0, 2.0, loss.shape[0], dtype=loss.dtype)).sum().backward()


def loss_and_grads(fn, hidden, weight, bias, labels, reduction, **kwargs):
    """Loss (and z-loss when returned) and the gradients of every input that requires grad."""
    params = [t for t in (hidden, weight, bias) if t is not None]
    for t in params:
        t.grad = None
    out = fn(hidden, weight, labels, bias=bias, reduction=reduction, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    backward_weighted(loss)
    extra = [out[1].detach()] if isinstance(out, tuple) else []
    return loss.detach(), [t.grad.clone() for t in params], extra


def formula_losses(logits, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss_scale=0.0, softcap=None,
                   temperature=1.0):
    """The module docstring's math written out independently of kernels/ (log_softmax, no F.cross_entropy)."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    z = z / temperature
    valid = labels != ignore_index
    logp = torch.log_softmax(z, dim=1)
    nll = -logp.gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    z_loss = z_loss_scale * torch.logsumexp(z, dim=1) ** 2 * valid
    loss = ((1 - label_smoothing) * nll - label_smoothing * logp.mean(dim=1)) * valid + z_loss
    return loss, z_loss


def reduce(losses, labels, reduction, ignore_index=-100):
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    return {"none": losses, "sum": losses.sum(), "mean": losses.sum() / n_valid}[reduction]


def formula_loss_and_grads(hidden, weight, bias, labels, reduction, *, compute_dtype, **opts):
    """fp64 truth (compute_dtype=float64), or PyTorch eager in the input dtype (None): logits in that dtype,
    loss math in fp32, as HF models do. Same outputs as `loss_and_grads`, z-loss always included."""
    dtype = compute_dtype or hidden.dtype
    params = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = params
    logits = F.linear(h, w, b)
    losses, z_losses = formula_losses(logits.double() if compute_dtype else logits.float(), labels, **opts)
    loss = reduce(losses, labels, reduction, opts.get("ignore_index", -100))
    backward_weighted(loss)
    z_loss = reduce(z_losses, labels, reduction, opts.get("ignore_index", -100)).detach()
    return loss.detach(), [t.grad for t in params if t is not None], [z_loss]


def rounding_scales(hidden, weight, bias, labels, reduction, *, ignore_index=-100, label_smoothing=0.0,
                    z_loss_scale=0.0, softcap=None, temperature=1.0):
    """What fp32 rounding errors scale with, per output (loss, grads, z-loss): the same sums as the outputs,
    but of absolute values, before any cancellation. At a confident target, softmax - 1 (and the loss,
    log(1 + small)) cancel to far below the terms they come from, while their rounding stays a few ulps of
    those terms: the textbook bound for sums, and what eager PyTorch's error on one scalar can undercut by
    luck."""
    if len(labels) == 0:
        return [0.0] * (5 if bias is not None else 4)
    h, w = hidden.detach().double(), weight.detach().double()
    x = F.linear(h, w, None if bias is None else bias.detach().double())
    z = (x if softcap is None else softcap * torch.tanh(x / softcap)) / temperature
    lse = torch.logsumexp(z, dim=1).abs()
    valid = (labels != ignore_index).double()
    loss_weight = valid / valid.sum().clamp(min=1) if reduction == "mean" else valid
    grad_output = torch.linspace(-1.0, 2.0, len(labels), dtype=torch.float64).abs() if reduction == "none" else 1.5
    row_terms = (lse + z.abs().amax(dim=1)) * (1 + z_loss_scale * lse)  # lse, z_y, the mean, z-loss
    loss = (loss_weight * row_terms).max() if reduction == "none" else (loss_weight * row_terms).sum()
    row_grad = loss_weight * grad_output * (2 + 2 * z_loss_scale * lse) / temperature  # >= sum_v |d loss / d x|
    scales = [loss, row_grad.max() * w.abs().max(), row_grad.sum() * h.abs().max()]
    scales += [row_grad.sum()] if bias is not None else []
    return [float(t) for t in (*scales, loss)]


def assert_error_bounded(names, ours, truth, eager, dtype, length, scales=None):
    """Each output's max error vs the fp64 truth is at most twice PyTorch eager's (same input dtype), plus tol
    of the output's own scale, plus tol of its `rounding_scales` when given. tol is the bound on two fp32
    summation orders of the longest reduction (`length` terms: rows, vocabulary or hidden size) through four
    chained reductions (logits, log-sum-exp, the loss, the gradient matmul), tests/tolerances.py; in 16-bit
    it is at least one ulp. A wrong index or a missing term errs by the scale itself."""
    tol = tolerances.reduction_rtol(torch.float32, length, chain=4)
    if dtype != torch.float32:
        tol = max(tol, torch.finfo(dtype).eps)
    for k, (name, o, t, e) in enumerate(zip(names, ours, truth, eager)):
        assert o.shape == t.shape, f"{name}: shape {tuple(o.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        if t.numel() == 0:
            continue
        diff = (o.double() - t).abs()
        err, err_eager = diff.max().item(), (e.double() - t).abs().max().item()
        rounding = tolerances.reduction_rtol(torch.float32, length, chain=4) * (scales[k] if scales else 0.0)
        allowed = 2 * err_eager + tol * t.abs().max().item() + rounding + tolerances.tiny_atol(torch.float32)
        if err > allowed:
            worst = tuple(torch.unravel_index(diff.argmax(), diff.shape)) if diff.dim() else ()
            worst = tuple(int(i) for i in worst)
            pytest.fail(
                f"{name}: max error vs fp64 {err:.3g} > allowed {allowed:.3g} (eager {dtype}: {err_eager:.3g}); "
                f"mean error {diff.mean():.3g}; worst at {worst}: {o[worst].item():.6g} vs {t[worst].item():.6g}"
            )


def check_fused(ours, hidden, weight, bias, labels, reduction, **opts):
    """`ours` from loss_and_grads against the fp64 truth, with PyTorch eager's error as the yardstick."""
    truth = formula_loss_and_grads(hidden, weight, bias, labels, reduction, compute_dtype=torch.float64, **opts)
    eager = formula_loss_and_grads(hidden, weight, bias, labels, reduction, compute_dtype=None, **opts)
    scales = rounding_scales(hidden, weight, bias, labels, reduction, **opts)
    loss, grads, extra = ours
    assert loss.dtype == torch.float32
    assert all(g.dtype == hidden.dtype for g in grads)
    names = ["loss", "grad hidden", "grad weight", "grad bias"][: 1 + len(grads)] + ["z-loss"] * len(extra)
    scales = scales[: 1 + len(grads)] + scales[-1:] * len(extra)
    flat = lambda r: [r[0], *r[1], *r[2]]  # noqa: E731
    length = max(*hidden.shape, weight.shape[0])
    assert_error_bounded(names, flat(ours), flat(truth), flat(eager), hidden.dtype, length, scales)


# --------------------------------------------------------------------------------------------------
# Fused linear cross-entropy: both paths against the fp64 truth
# --------------------------------------------------------------------------------------------------

SHAPES = [(37, 53, 16, 7), (1, 2, 3, None), (64, 97, 8, 64), (13, 101, 5, 1), (29, 31, 7, 100), (40, 127, 12, None)]
# The interpreter runs one program per row in Python: the Triton path gets the shapes that matter.
CASES = [("reference", *s) for s in SHAPES] + [
    pytest.param("triton", *s, marks=pytest.mark.triton) for s in (SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[5])
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend,n,v,d,chunk_size", CASES)
def test_fused_fp32_matches_truth(backend, n, v, d, chunk_size, bias, reduction):
    hidden, weight, b, labels = make_inputs(n, v, d, bias=bias)
    ours = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=chunk_size, backend=backend
    )
    check_fused(ours, hidden, weight, b, labels, reduction)


def test_unchunked_reference_matches_truth():
    hidden, weight, b, labels = make_inputs(23, 41, 6)
    for reduction in REDUCTIONS:
        for opts in ({}, *OPTION_SETS.values()):
            ours = loss_and_grads(ce.linear_cross_entropy_reference, hidden, weight, b, labels, reduction, **opts)
            check_fused(ours, hidden, weight, b, labels, reduction, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_match_truth(backend, options, reduction):
    """Label smoothing, z-loss (returned separately too), softcap, temperature, and all four at once."""
    opts = OPTION_SETS[options]
    hidden, weight, b, labels = make_inputs(29, 67, 9, scale=4.0, seed=2)
    ours = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=11, backend=backend,
        return_z_loss=True, **opts,
    )
    check_fused(ours, hidden, weight, b, labels, reduction, **opts)


@interpreted_only
@pytest.mark.parametrize("v", [53, 64, 200])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_triton_vocab_tiles(v, options, monkeypatch):
    """V below, equal to and above one kernel tile (64 here), the last tile partial: online LSE across tiles."""
    monkeypatch.setattr(ce, "_MAX_BLOCK_V", 64)
    opts = OPTION_SETS.get(options, {})
    hidden, weight, b, labels = make_inputs(19, v, 8, scale=3.0, seed=4)
    labels[-1] = v - 1  # the last column, in the partial tile
    ours = loss_and_grads(ce.fused_linear_cross_entropy, hidden, weight, b, labels, "sum", backend="triton", **opts)
    check_fused(ours, hidden, weight, b, labels, "sum", **opts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(backend, reduction, dtype):
    """16-bit inputs: fp32 loss, grads in the input dtype, error vs fp64 at most ~2x PyTorch eager's in that dtype.

    The kernel has no tl.dot, so bf16 is exact in the interpreter too (docs/design.md: only tl.dot on bf16 is not).
    """
    opts = dict(label_smoothing=0.1, z_loss_scale=1e-3)
    hidden, weight, b, labels = make_inputs(45, 89, 24, dtype=dtype, seed=1)
    ours = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=8, backend=backend, **opts
    )
    check_fused(ours, hidden, weight, b, labels, reduction, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_not_nan(backend, reduction):
    hidden, weight, b, labels = make_inputs(11, 17, 4, ignore_frac=1.0)
    loss, grads, (z_loss,) = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=3, backend=backend,
        return_z_loss=True, **OPTION_SETS["all"],
    )
    for t in (loss, z_loss, *grads):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_inside_vocab(backend, reduction):
    """ignore_index may be a real class id (e.g. a pad token); those rows drop out."""
    hidden, weight, b, labels = make_inputs(23, 19, 6, ignore_frac=0.0)
    labels[::3] = 5
    kw = dict(ignore_index=5)
    ours = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=4, backend=backend, **kw
    )
    check_fused(ours, hidden, weight, b, labels, reduction, **kw)
    if reduction == "none":
        assert torch.equal(ours[0][labels == 5], torch.zeros(int((labels == 5).sum())))


@pytest.mark.parametrize("options", ["plain", "smoothing", "z_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend, reduction, options):
    """Logits around 1e4 (far past exp's fp32 range) stay finite and match the fp64 truth."""
    opts = {"plain": {}, "smoothing": dict(label_smoothing=0.2), "z_loss": dict(z_loss_scale=1e-6)}[options]
    hidden, weight, b, labels = make_inputs(17, 41, 8, scale=3e3, ignore_frac=0.1)
    with torch.no_grad():
        assert (hidden @ weight.T).abs().max() > 5e3
    ours = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=5, backend=backend, **opts
    )
    check_fused(ours, hidden, weight, b, labels, reduction, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    hidden, weight, b, labels = make_inputs(9, 13, 4)
    weight.requires_grad_(False)
    loss = ce.fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4, backend=backend)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None and b.grad is not None
    with torch.no_grad():
        no_grad_loss = ce.fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4, backend=backend)
    assert not no_grad_loss.requires_grad
    assert_close(no_grad_loss, loss.detach(), atol=0, rtol=0, name="loss under no_grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_fused_z_loss_is_returned_without_gradient(backend):
    """Found by the fuzzer: the reference path of `cross_entropy` returned a z-loss that required grad."""
    logits, labels = make_logits(6, 9)
    loss, z_loss = ce.cross_entropy(logits, labels, z_loss_scale=0.1, return_z_loss=True, backend=backend)
    assert loss.requires_grad and not z_loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_is_returned_without_gradient(backend):
    hidden, weight, b, labels = make_inputs(9, 13, 4)
    loss, z_loss = ce.fused_linear_cross_entropy(
        hidden, weight, labels, bias=b, z_loss_scale=0.1, return_z_loss=True, backend=backend
    )
    assert loss.requires_grad and not z_loss.requires_grad
    assert 0 < z_loss.item() < loss.item()
    without = ce.fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend=backend)
    # Sums over the 9 rows of terms no larger than the loss's (and the z-loss's) own: two fp32 evaluations each.
    tol = tolerances.reduction_atol(torch.float32, 13, loss.item() + z_loss.item(), chain=2)
    assert_close(loss - z_loss, without, atol=tol, rtol=0.0, name="loss minus z-loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    hidden, weight, b, labels = make_inputs(0, 7, 3)
    for reduction in REDUCTIONS:
        loss = ce.fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, backend=backend)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert torch.isfinite(loss).all()
        loss.sum().backward()


def test_trainer_call_unchanged():
    """fastmath/model.py's call (keywords bias / reduction / chunk_size) on the public import, CPU reference."""
    hidden, weight, _, labels = make_inputs(12, 21, 5)
    ours = loss_and_grads(kernels.fused_linear_cross_entropy, hidden, weight, None, labels, "sum", chunk_size=None)
    check_fused(ours, hidden, weight, None, labels, "sum")


def test_default_chunk_sizes():
    """The docstring's arithmetic: 512 MiB of bf16 logits at V = 152k is 1,664 rows (13 x 128)."""
    assert ce._default_chunk_size(16384, 151936, True, 2) == 1664
    assert ce._default_chunk_size(100, 151936, True, 2) == 100
    assert ce._default_chunk_size(16384, 151936, False, 2) == 110  # 64 MiB of fp32
    assert ce._default_chunk_size(10, 2**31, True, 4) == 1
    # kernels/chunking.py's arithmetic for a 2 GiB budget, and a budget below one row still gives one row.
    assert ce._default_chunk_size(16384, 151936, True, 2, 2 * 2**30) == 7040
    assert ce._default_chunk_size(16384, 151936, False, 2, 2**30) == 1766  # fp32 logits on the PyTorch path
    assert ce._default_chunk_size(16384, 151936, True, 2, 1) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_bytes_sets_the_rows_per_chunk(backend):
    """chunk_bytes is a logits budget: on either path it gives the rows chunk_size names for the same budget
    (bit-identical losses and gradients: same chunks, same order). The one-chunk result differs in the last bits
    of d weight (another fp32 sum order), so a budget that was ignored would fail here."""
    hidden, weight, b, labels = make_inputs(29, 37, 8, seed=5)
    logit_bytes = 4  # fp32 inputs: fp32 logits on both paths

    def run(**chunking):
        loss, grads, _ = loss_and_grads(ce.fused_linear_cross_entropy, hidden, weight, b, labels, "sum",
                                        backend=backend, **chunking)
        return [loss, *grads]

    whole = run(chunk_size=29)
    for rows in (3, 7):
        by_rows, by_bytes = run(chunk_size=rows), run(chunk_bytes=rows * 37 * logit_bytes + logit_bytes - 1)
        for got, want in zip(by_bytes, by_rows):
            assert torch.equal(got, want)
        assert not all(torch.equal(got, one) for got, one in zip(by_bytes, whole))


@interpreted_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp16_mean_gradient_keeps_entries_below_fp16_range(reduction):
    """fp16, reduction="mean" (or "none" followed by a mean, which hands backward g_i = 1/N): softmax / N is below fp16's smallest subnormal (2^-24) for most vocabulary entries
    of a long batch (N = 16k rows, V = 152k: p ~ 1/V), so the kernel must not store it; d weight and d hidden
    against fp32. The interpreter runs ~25 ms per row, so the regime is reached with N = 256 rows and four rare
    classes held ~14 nats down by the bias (p ~ 1e-6, p / N < 2^-24: 0 or 2^-24 if stored): their d weight
    (~2e-6, inside fp16's subnormal range) would come back wrong by 50-100%."""
    n, v, d = 256, 6, 4
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(n, d, generator=gen) + 2).half().requires_grad_()  # a mean, so d weight does not cancel
    weight = (torch.randn(v, d, generator=gen) * 0.3).half().requires_grad_()
    bias = torch.tensor([0.0, 0.0, -14.0, -14.0, -14.0, -14.0]).half()
    labels = torch.randint(0, 2, (n,), generator=gen)  # classes 2.. are never the target
    ce.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, backend="triton").mean(
    ).backward()
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    logits = h32 @ w32.T + bias.float()
    ce.cross_entropy_reference(logits, labels, reduction=reduction).mean().backward()
    dlogits = torch.softmax(logits.detach().double(), dim=1) - F.one_hot(labels, v).double()
    assert (dlogits[:, 2:].abs() / n < 2.0**-24).all() and (w32.grad[2:].abs() > 2.0**-23).all()
    # Roundings: the logits in fp16 (moving p by up to ~2 u |z|, u = 2^-11), each unscaled dlogit in fp16
    # (relative u, absolute 2^-25 below the normal range), fp32 matmuls, one rounding of each result to fp16.
    u16, floor16 = tolerances.unit_roundoff(torch.float16), 2.0**-25
    z_max = logits.detach().double().abs().amax(1, keepdim=True)
    entry = 4 * u16 * (z_max + 1) * dlogits.abs() + floor16
    for name, ours, truth in (("d weight", weight.grad, w32.grad), ("d hidden", hidden.grad, h32.grad)):
        other = (hidden if name == "d weight" else weight).detach().double().abs()
        spread = entry.T @ other if name == "d weight" else entry @ other
        atol = spread / n + 2 * u16 * truth.double().abs() + floor16
        assert_close(ours, truth, atol=atol, rtol=0.0, name=f"{name} (fp16, {reduction})")


@pytest.mark.parametrize(
    "v,block_v,num_warps",
    [(1, 1, 1), (53, 64, 1), (1000, 1024, 2), (3000, 1024, 2), (32003, 8192, 16), (50257, 4096, 8),
     (151936, 8192, 16)],
)  # fmt: skip
def test_row_tile_from_vocabulary(v, block_v, num_warps):
    """The row kernels' tile: a power of two, at most 8192, padding at most V / 8 past 1024; 16 elements a thread."""
    assert chunking.row_tile(v) == (block_v, num_warps)
    assert block_v & (block_v - 1) == 0 and block_v <= chunking.MAX_BLOCK_V
    padding = -(-v // block_v) * block_v - v
    assert block_v <= 1024 or padding * 8 <= v
    assert chunking.row_tile(v, 64)[0] == min(block_v, 64)


@pytest.mark.parametrize("v", [1, 16, 50257, 32003, 151936])
def test_logits_rows_start_at_32_byte_boundaries(v):
    buf = chunking.logits_buffer(torch.empty(0, dtype=torch.bfloat16), 5, v)
    assert buf.shape == (5, v) and buf.stride(1) == 1
    assert buf.stride(0) % 16 == 0 and 0 <= buf.stride(0) - v < 16


@pytest.mark.parametrize(
    "version,dtype,tensor_cores,method",
    [("2.8.0+cu128", torch.bfloat16, True, "16bit_then_add"), ("2.9.1", torch.float16, True, "16bit_then_add"),
     ("2.10.0", torch.bfloat16, True, "addmm_fp32"), ("2.11.0+cu130", torch.bfloat16, True, "addmm_fp32"),
     ("2.10.0a0+git0", torch.bfloat16, True, "16bit_then_add"), ("2.11.0", torch.bfloat16, False, "fp32"),
     ("2.11.0", torch.float32, True, "fp32")],
)  # fmt: skip
def test_weight_grad_method_follows_torch_version(version, dtype, tensor_cores, method):
    """torch 2.8 / 2.9 refuse addmm(fp32 self, 16-bit mats, out_dtype=fp32); from 2.10 it is one cuBLAS call."""
    assert chunking.weight_grad_method(dtype, tensor_cores, version) == method


def test_weight_grad_fallback_accumulates_the_same_sum(monkeypatch):
    """The pre-2.10 path (16-bit product rounded once, added in fp32) against the fp32 path, bf16 operands."""
    gen = torch.Generator().manual_seed(0)
    dlogits, h = torch.randn(40, 30, generator=gen).bfloat16(), torch.randn(40, 8, generator=gen).bfloat16()
    exact = torch.zeros(30, 8)
    chunking.add_weight_grad(exact, dlogits, h)
    monkeypatch.setattr(chunking, "weight_grad_method", lambda *args: "16bit_then_add")
    fallback = torch.ones(30, 8)
    chunking.add_weight_grad(fallback, dlogits, h)
    magnitude = tolerances.dot_magnitude(dlogits.T, h)
    atol = 2 * tolerances.unit_roundoff(torch.bfloat16) * (magnitude + 1) + tolerances.reduction_atol(
        torch.float32, 40, 1.0) * magnitude  # fmt: skip
    assert_close(fallback - 1, exact, atol=atol, rtol=0.0, name="16-bit product then fp32 add")


@pytest.mark.parametrize("method", ["fp32", "16bit_then_add"])
def test_first_chunk_overwrites_an_uninitialised_accumulator(monkeypatch, method):
    """overwrite=True writes the product over whatever the accumulator held (NaN here: beta = 0 must not read
    it), and the next chunk adds to it; two chunks give the one-matmul product."""
    gen = torch.Generator().manual_seed(1)
    dlogits, h = torch.randn(40, 30, generator=gen).bfloat16(), torch.randn(40, 8, generator=gen).bfloat16()
    monkeypatch.setattr(chunking, "weight_grad_method", lambda *args: method)
    acc = torch.full((30, 8), float("nan"))
    chunking.add_weight_grad(acc, dlogits[:25], h[:25], overwrite=True)
    chunking.add_weight_grad(acc, dlogits[25:], h[25:])
    expected = dlogits.T.double() @ h.double()
    magnitude = tolerances.dot_magnitude(dlogits.T, h)
    atol = 2 * tolerances.unit_roundoff(torch.bfloat16) * (magnitude + 1) + tolerances.reduction_atol(
        torch.float32, 40, 1.0) * magnitude  # fmt: skip
    assert_close(acc.double(), expected, atol=atol, rtol=0.0, name=f"{method}: chunk 1 overwrites, chunk 2 adds")


def test_weight_grad_accumulator_is_zero_without_rows():
    """No rows, no chunk to overwrite it: the accumulator must start at 0 (the gradient of an empty batch)."""
    weight = torch.randn(5, 3)
    assert torch.equal(chunking.weight_grad_accumulator(weight, torch.float32, 0), torch.zeros(5, 3))
    assert chunking.weight_grad_accumulator(weight, torch.float32, 4).shape == (5, 3)


# --------------------------------------------------------------------------------------------------
# Dispatch and argument checks
# --------------------------------------------------------------------------------------------------


@interpreted_only
def test_backend_dispatch(monkeypatch):
    hidden, weight, b, labels = make_inputs(8, 11, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ce._use_triton("auto", hidden.device)
    assert ce._use_triton("triton", hidden.device)  # this copy's kernels are interpreted
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ce._use_triton("auto", hidden.device)
    assert not ce._use_triton("reference", hidden.device)
    auto = ce.fused_linear_cross_entropy(hidden, weight, labels, bias=b)
    ref = ce.fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend="reference")
    scales = rounding_scales(hidden, weight, b, labels, "mean")
    tol = tolerances.reduction_rtol(torch.float32, 11, chain=4) * scales[0]
    assert_close(auto, ref, atol=tol, rtol=0.0, name="auto (Triton) vs reference")
    with pytest.raises(ValueError, match="backend"):
        ce.fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend="cuda")


@pytest.mark.skipif(INTERPRETED, reason="kernels were imported under TRITON_INTERPRET=1")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    hidden, weight, b, labels = make_inputs(4, 5, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ce._use_triton("auto", hidden.device)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ce.fused_linear_cross_entropy(hidden, weight, labels, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="before triton and kernels.cross_entropy are imported"):
        ce.cross_entropy(hidden @ weight.T, labels)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda h, w, b, y: (h, w[:, :-1], b, y), r"weight.shape\[1\]"),
        (lambda h, w, b, y: (h[0], w, b, y), "hidden must be 2-D"),
        (lambda h, w, b, y: (h, w[0], b, y), "weight must be 2-D"),
        (lambda h, w, b, y: (h, w[:0], b[:0], y), "at least one row"),
        (lambda h, w, b, y: (h, w, b, y[:-1]), "labels must be 1-D"),
        (lambda h, w, b, y: (h, w, b, y.float()), "integer dtype"),
        (lambda h, w, b, y: (h, w, b, y.bool()), "integer dtype"),
        (lambda h, w, b, y: (h, w, b, torch.where(y == 0, 11, y)), r"\[0, V\).*labels\[\d+\] = 11"),
        (lambda h, w, b, y: (h, w, b, torch.full_like(y, -1)), r"labels\[0\] = -1"),
        (lambda h, w, b, y: (h, w, b[:-1], y), "bias must have shape"),
        (lambda h, w, b, y: (h, w.double(), b, y), "weight dtype"),
        (lambda h, w, b, y: (h, w, b.half(), y), "bias dtype"),
    ],
)
def test_bad_inputs_raise(change, match):
    hidden, weight, b, labels = make_inputs(6, 11, 4, ignore_frac=0.0, seed=3)
    labels[0] = 0
    args = change(hidden.detach(), weight.detach(), b.detach(), labels)
    for fn in (ce.fused_linear_cross_entropy, ce.linear_cross_entropy_reference):
        with pytest.raises(ValueError, match=match):
            fn(args[0], args[1], args[3], bias=args[2])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(reduction="avg"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-3), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(chunk_bytes=0), "chunk_bytes"),
        (dict(chunk_bytes=2.5e6), "chunk_bytes"),
        (dict(chunk_bytes=True), "chunk_bytes"),
        (dict(chunk_size=4, chunk_bytes=2**20), "chunk_size .* or chunk_bytes"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(z_loss_scale=-1.0), "z_loss_scale"),
        (dict(z_loss_scale=float("inf")), "z_loss_scale"),
        (dict(softcap=0.0), "softcap"),
        (dict(softcap=-2.0), "softcap"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(ignore_index=1.5), "ignore_index"),
    ],
)
def test_bad_options_raise(kwargs, match):
    hidden, weight, b, labels = make_inputs(6, 11, 4)
    with pytest.raises(ValueError, match=match):
        ce.fused_linear_cross_entropy(hidden, weight, labels, **kwargs)
    kwargs.pop("chunk_size", None)
    kwargs.pop("chunk_bytes", None)
    if kwargs:
        with pytest.raises(ValueError, match=match):
            ce.cross_entropy(hidden @ weight.T, labels, **kwargs)


# --------------------------------------------------------------------------------------------------
# Non-fused cross_entropy on given logits
# --------------------------------------------------------------------------------------------------


def make_logits(n, v, *, dtype=torch.float32, scale=3.0, ignore_frac=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, v, generator=gen) * scale).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    return base, labels


def ce_loss_and_grad(fn, base, labels, reduction, **opts):
    base.grad = None
    logits = base * 1  # a non-leaf, as in a model: the Triton path overwrites its storage with the gradient
    out = fn(logits, labels, reduction=reduction, **opts)
    loss = out[0] if isinstance(out, tuple) else out
    backward_weighted(loss)
    return loss.detach(), base.grad.clone(), logits.detach()


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_cross_entropy_matches_truth(options, reduction, dtype, monkeypatch):
    monkeypatch.setattr(ce, "_MAX_BLOCK_V", 128)  # 200 columns: two tiles, the last partial
    opts = OPTION_SETS.get(options, {})
    base, labels = make_logits(21, 200, dtype=dtype)
    loss, grad, logits_after = ce_loss_and_grad(
        lambda *a, **k: ce.cross_entropy(*a, backend="triton", **k), base, labels, reduction, **opts
    )
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # In place: the logits' storage holds their gradient (no second [N, V] buffer).
    assert torch.equal(logits_after, grad)
    truth = []
    for compute in (torch.float64, torch.float32):  # fp64 truth; PyTorch eager (fp32 math on these logits)
        t_base = base.detach().to(compute).requires_grad_()
        t_loss = reduce(formula_losses(t_base, labels, **opts)[0], labels, reduction)
        backward_weighted(t_loss)
        truth.append([t_loss.detach(), t_base.grad.to(dtype) if compute == torch.float32 else t_base.grad])
    assert_error_bounded(["loss", "grad logits"], [loss, grad], truth[0], truth[1], dtype, base.shape[1])
    ref_loss, _, ref_logits_after = ce_loss_and_grad(ce.cross_entropy_reference, base, labels, reduction, **opts)
    # Two fp32 evaluations: per row a log-sum-exp over V and the target's term, then the sum over rows; the
    # terms are at most |lse| + max |z| per row (what rounding_scales uses for the fused loss).
    z = base.detach().double()
    row_terms = torch.logsumexp(z, dim=1).abs() + z.abs().amax(dim=1)
    magnitude = row_terms if reduction == "none" else row_terms.sum() / (len(labels) if reduction == "mean" else 1)
    atol = tolerances.reduction_atol(torch.float32, max(base.shape), 1.0, chain=2) * magnitude
    assert_close(ref_loss, loss, atol=atol, rtol=0.0, name="reference loss")
    assert torch.equal(ref_logits_after, base.detach()), "the reference must not write to its input"


@interpreted_only
def test_cross_entropy_in_place_is_guarded():
    base, labels = make_logits(6, 20)
    # A node that saved the logits (tanh saves its output) fails loudly instead of using the gradient.
    loss = ce.cross_entropy(torch.tanh(base), labels, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Backward runs once: the gradient was handed out from the logits' storage.
    loss = ce.cross_entropy(base * 1, labels, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()
    # Without grad, and for logits with a strided last dimension (copied first), the input is left intact.
    with torch.no_grad():
        before = base.detach().clone()
        ce.cross_entropy(base, labels, backend="triton")
    assert torch.equal(base.detach(), before)
    transposed = base.detach().T.contiguous().T.requires_grad_()
    loss = ce.cross_entropy(transposed, labels, backend="triton")
    loss.backward()
    assert torch.equal(transposed.detach(), before)
    truth = ce.cross_entropy_reference(before.requires_grad_(), labels)
    truth.backward()
    # softmax - one-hot, scaled by 1 / rows: a log-sum-exp over V per row and the mean's count.
    tol = tolerances.reduction_rtol(torch.float32, before.shape[1], chain=2)
    assert_close(transposed.grad, before.grad, atol=tol / before.shape[0], rtol=tol, name="grad of strided logits")


@interpreted_only
def test_cross_entropy_all_ignored_and_empty():
    base, labels = make_logits(5, 9, ignore_frac=1.0)
    for reduction in REDUCTIONS:
        loss, grad, _ = ce_loss_and_grad(
            lambda *a, **k: ce.cross_entropy(*a, backend="triton", **k), base, labels, reduction, z_loss_scale=0.1
        )
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))
    empty, labels = make_logits(0, 9)
    assert ce.cross_entropy(empty, labels, backend="triton").item() == 0.0


# --------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------

OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "label_smoothing": st.sampled_from([0.0, 0.05, 1.0]),
        "z_loss_scale": st.sampled_from([0.0, 1e-3, 0.5]),
        "softcap": st.sampled_from([None, 0.5, 30.0]),
        "temperature": st.sampled_from([0.3, 1.0, 2.0]),
    },
)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(2, 60),
    d=st.integers(1, 12),
    chunk_size=st.one_of(st.none(), st.integers(1, 50)),
    reduction=st.sampled_from(REDUCTIONS),
    bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    opts=OPTIONS,
    seed=st.integers(0, 2**16),
)
def test_property_reference_path(n, v, d, chunk_size, reduction, bias, ignore_frac, opts, seed):
    hidden, weight, b, labels = make_inputs(n, v, d, bias=bias, ignore_frac=ignore_frac, seed=seed, scale=3.0)
    ours = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=chunk_size,
        backend="reference", **opts,
    )
    check_fused(ours, hidden, weight, b, labels, reduction, **opts)


@interpreted_only
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    v=st.integers(1, 150),
    d=st.integers(1, 12),
    chunk_size=st.one_of(st.none(), st.integers(1, 30)),
    block_v=st.sampled_from([16, 64, 8192]),
    reduction=st.sampled_from(REDUCTIONS),
    bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    opts=OPTIONS,
    seed=st.integers(0, 2**16),
)
def test_property_triton_path(n, v, d, chunk_size, block_v, reduction, bias, ignore_frac, opts, seed):
    hidden, weight, b, labels = make_inputs(n, v, d, bias=bias, ignore_frac=ignore_frac, seed=seed, scale=3.0)
    with mock.patch.object(ce, "_MAX_BLOCK_V", block_v):
        ours = loss_and_grads(
            ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=chunk_size,
            backend="triton", **opts,
        )
    check_fused(ours, hidden, weight, b, labels, reduction, **opts)


# --------------------------------------------------------------------------------------------------
# Memory shape: no [N, V] tensor on either fused path
# --------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op produces, forward and backward, while active.

    Bytes, not elements: the interpreter views kernel arguments' storages as uint8 tensors.
    """

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.bytes:
                self.bytes, self.op = t.numel() * t.element_size(), str(func)
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_full_logits(backend, dtype, reduction):
    n, v, d, chunk = 48, 257, 8, 16
    hidden, weight, b, labels = make_inputs(n, v, d, dtype=dtype)
    with LargestTensor() as chunked:
        loss = ce.fused_linear_cross_entropy(
            hidden, weight, labels, bias=b, reduction=reduction, chunk_size=chunk, backend=backend,
            **OPTION_SETS["all"],
        )
        loss.sum().backward()
    # Chunk logits are fp32 on the PyTorch path (as is its weight copy), in the input dtype on Triton's, whose
    # rows are padded to a multiple of 16 elements.
    rows = chunk * chunking.padded_row_stride(v)
    assert chunked.bytes <= 4 * max(rows, v * d, n * d), f"{chunked.bytes} bytes from {chunked.op}"
    # The recorder sees the full logits when they are built, so the check above is not vacuous.
    with LargestTensor() as full:
        ce.linear_cross_entropy_reference(hidden, weight, labels, bias=b, reduction=reduction).sum().backward()
    assert full.bytes >= 4 * n * v


# --------------------------------------------------------------------------------------------------
# The compiled kernel: built for an H100 without one; run on CUDA (bf16 included) where a GPU exists
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="the interpreter stands in for the compiler in this process")
@pytest.mark.parametrize("dtype,switches", [("bf16", True), ("fp16", False), ("fp32", True)])
def test_kernel_compiles_for_sm90(dtype, switches):
    """Triton's compiler, down to an sm_90 cubin, on CPU: types, loop-carried values and the early return of
    compiled mode, which the interpreter never checks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = ce._cross_entropy_kernel
    types = [f"*{dtype}", f"*{dtype}", "*i64", "*fp32", "*fp32", "*fp32", "i32", "i64", "i32", "i32"] + ["fp32"] * 4
    constexprs = dict(HAS_BIAS=switches, HAS_SOFTCAP=switches, HAS_SMOOTHING=switches, WRITE_GRAD=switches,
                      BLOCK_V=chunking.MAX_BLOCK_V)
    signature = {**dict(zip(kernel.arg_names, types)), **{name: "constexpr" for name in constexprs}}
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert compiled.asm["cubin"]


cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, compiled kernels")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_cuda_fused_matches_eager(options, reduction, dtype):
    """Compiled kernel, awkward sizes (V = 32003 spans tiles, N = 1031 spans chunks); error vs fp64 <= 2x eager's."""
    opts = OPTION_SETS.get(options, {})
    cpu_inputs = make_inputs(1031, 32003, 64, dtype=dtype, scale=4.0, seed=7)
    hidden, weight, b, labels = (t.detach().cuda().requires_grad_(t.requires_grad) for t in cpu_inputs)
    labels = labels.detach()
    ours = loss_and_grads(
        ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=384,
        backend="triton", **opts,
    )
    eager = formula_loss_and_grads(hidden, weight, b, labels, reduction, compute_dtype=None, **opts)
    truth = formula_loss_and_grads(hidden, weight, b, labels, reduction, compute_dtype=torch.float64, **opts)
    for name, o, e, t in zip(("loss", "hidden", "weight", "bias"), [ours[0], *ours[1]], [eager[0], *eager[1]],
                             [truth[0], *truth[1]]):
        err_ours, err_eager = (o.double() - t).abs().max().item(), (e.double() - t).abs().max().item()
        tiny = tolerances.reduction_rtol(torch.float32, 1031, chain=4) * t.abs().max().item() + \
            tolerances.tiny_atol(torch.float32)
        assert err_ours <= 2 * err_eager + tiny, f"{name}: error {err_ours:.3g} vs eager {dtype}'s {err_eager:.3g}"


@cuda
def test_cuda_int64_offsets():
    """N * V > 2^31 elements: rows past the int32 range get the right loss (needs ~4.5 GB of GPU memory)."""
    n, v = 16500, 131072
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=gen)
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    losses = ce.cross_entropy(logits, labels, reduction="none", backend="triton")
    tail = slice(n - 64, n)  # rows beyond 2^31 / V = 16384
    truth = F.cross_entropy(logits[tail].double(), labels[tail], reduction="none")
    # bf16 logits are exact in fp32; the kernel's log-sum-exp over V = 131072 in fp32, the truth's in fp64.
    tol = tolerances.reduction_rtol(torch.float32, v, chain=2)
    assert_close(losses[tail], truth, atol=tol * (truth.abs() + logits[tail].double().abs().amax(1)), rtol=0.0,
                 name="tail losses")
