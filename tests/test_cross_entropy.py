"""kernels/cross_entropy.py: the chunked path against the unchunked definition and an fp64 truth."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels import fused_linear_cross_entropy
from kernels.cross_entropy import linear_cross_entropy_reference

REDUCTIONS = ("mean", "sum", "none")


def assert_close(actual, expected, *, atol, rtol, name):
    """Like torch.testing.assert_close, but the message gives max / mean difference and the first bad index."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        pytest.fail(
            f"{name}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}, {int(bad.sum())} bad of {diff.numel()}; "
            f"first bad index {first}: {actual[first]:.6g} vs {expected[first]:.6g}"
        )


def make_inputs(n, v, d, *, dtype=torch.float32, bias=True, ignore_frac=0.2, ignore_index=-100, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * scale / d**0.5).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(v, generator=gen).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    return hidden, weight, b, labels


def loss_and_grads(fn, hidden, weight, bias, labels, reduction, **kwargs):
    """Loss and the gradients of every input that requires grad; "none" is reduced with fixed random weights."""
    params = [t for t in (hidden, weight, bias) if t is not None]
    for t in params:
        t.grad = None
    loss = fn(hidden, weight, labels, bias=bias, reduction=reduction, **kwargs)
    if reduction == "none":
        row_weights = torch.linspace(-1.0, 2.0, loss.shape[0])
        (loss * row_weights).sum().backward()
    else:
        (loss * 1.5).backward()  # a grad_output other than 1
    return loss.detach(), [t.grad.clone() for t in params]


def fp64_truth(hidden, weight, bias, labels, reduction, ignore_index=-100):
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    logits = h @ w.T + (0 if b is None else b)
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    loss = {"none": losses, "sum": losses.sum(), "mean": losses.sum() / n_valid}[reduction]
    if reduction == "none":
        (loss * torch.linspace(-1.0, 2.0, loss.shape[0], dtype=torch.float64)).sum().backward()
    else:
        (loss * 1.5).backward()
    return loss.detach(), [t.grad for t in (h, w, b) if t is not None]


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "n,v,d,chunk_size",
    [(37, 53, 16, 7), (1, 2, 3, None), (64, 97, 8, 64), (13, 101, 5, 1), (29, 31, 7, 100), (40, 127, 12, None)],
)
def test_matches_reference_fp32(n, v, d, chunk_size, bias, reduction):
    hidden, weight, b, labels = make_inputs(n, v, d, bias=bias)
    loss, grads = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=chunk_size
    )
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, reduction)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, r, atol=1e-5, rtol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_low_precision_inputs(dtype, reduction, bias):
    """fp16/bf16 inputs: fp32 loss, grads in the input dtype, error vs fp64 at most ~2x the reference's."""
    hidden, weight, b, labels = make_inputs(45, 89, 24, dtype=dtype, bias=bias, seed=1)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=8)
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, reduction)
    true_loss, true_grads = fp64_truth(hidden, weight, b, labels, reduction)
    assert loss.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    names = ("loss", "grad hidden", "grad weight", "grad bias")
    for name, ours, ref, truth in zip(names, [loss, *grads], [ref_loss, *ref_grads], [true_loss, *true_grads]):
        if name != "loss":
            assert ours.dtype == dtype, name
        err_ours = (ours.double() - truth).abs().max().item()
        err_ref = (ref.double() - truth).abs().max().item()
        assert err_ours <= 2 * err_ref + eps * truth.abs().max().item() * 0.5 + 1e-6, (
            f"{name}: error vs fp64 {err_ours:.3g}, reference's {err_ref:.3g}"
        )
        assert_close(ours, ref, atol=1e-6, rtol=2 * eps, name=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero_not_nan(reduction):
    hidden, weight, b, labels = make_inputs(11, 17, 4, ignore_frac=1.0)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=3)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_custom_ignore_index_inside_vocab(reduction):
    """ignore_index may be a real class id (e.g. a pad token); those rows drop out."""
    hidden, weight, b, labels = make_inputs(23, 19, 6, ignore_frac=0.0)
    labels[::3] = 5
    kw = dict(ignore_index=5)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=4, **kw)
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, reduction, **kw)
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, atol=1e-5, rtol=1e-5, name="grad")
    if reduction == "none":
        assert torch.equal(loss[labels == 5], torch.zeros(int((labels == 5).sum())))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_logits_do_not_overflow(reduction):
    """Logits around 1e4 (far past exp's fp32 range) stay finite and match the fp64 truth."""
    hidden, weight, b, labels = make_inputs(17, 41, 8, scale=3e3, ignore_frac=0.1)
    with torch.no_grad():
        assert (hidden @ weight.T).abs().max() > 5e3
    loss, grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=5)
    true_loss, true_grads = fp64_truth(hidden, weight, b, labels, reduction)
    assert_close(loss, true_loss, atol=1e-2, rtol=1e-4, name="loss")
    for name, g, t in zip(("hidden", "weight", "bias"), grads, true_grads):
        assert_close(g, t, atol=1e-3, rtol=1e-4, name=f"grad {name}")


def test_only_requested_gradients():
    hidden, weight, b, labels = make_inputs(9, 13, 4)
    weight.requires_grad_(False)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None and b.grad is not None
    with torch.no_grad():
        no_grad_loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=4)
    assert not no_grad_loss.requires_grad
    assert_close(no_grad_loss, loss.detach(), atol=0, rtol=0, name="loss under no_grad")


def test_empty_batch():
    hidden, weight, b, labels = make_inputs(0, 7, 3)
    for reduction in REDUCTIONS:
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert torch.isfinite(loss).all()


def test_backend_argument():
    hidden, weight, b, labels = make_inputs(8, 11, 4)
    auto = fused_linear_cross_entropy(hidden, weight, labels, bias=b)
    ref = fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend="reference")
    assert torch.equal(auto, ref)
    with pytest.raises(NotImplementedError, match="Triton path lands"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend="cuda")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda h, w, b, y: (h, w[:, :-1], b, y), r"weight.shape\[1\]"),
        (lambda h, w, b, y: (h[0], w, b, y), "hidden must be 2-D"),
        (lambda h, w, b, y: (h, w[0], b, y), "weight must be 2-D"),
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
    for fn in (fused_linear_cross_entropy, linear_cross_entropy_reference):
        with pytest.raises(ValueError, match=match):
            fn(args[0], args[1], args[3], bias=args[2])


def test_bad_reduction_and_chunk_size_raise():
    hidden, weight, b, labels = make_inputs(6, 11, 4)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            fused_linear_cross_entropy(hidden, weight, labels, chunk_size=bad)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(2, 60),
    d=st.integers(1, 12),
    chunk_size=st.one_of(st.none(), st.integers(1, 50)),
    reduction=st.sampled_from(REDUCTIONS),
    bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(n, v, d, chunk_size, reduction, bias, ignore_frac, seed):
    hidden, weight, b, labels = make_inputs(n, v, d, bias=bias, ignore_frac=ignore_frac, seed=seed)
    loss, grads = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_size=chunk_size
    )
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, reduction)
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close(g, r, atol=1e-5, rtol=1e-5, name=f"grad {name}")


# --------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_allocates_full_logits(reduction, dtype):
    n, v, d, chunk = 64, 257, 8, 16
    hidden, weight, b, labels = make_inputs(n, v, d, dtype=dtype)
    with LargestTensor() as chunked:
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, chunk_size=chunk)
        loss.sum().backward()
    assert chunked.numel < n * v, f"largest tensor {chunked.numel} elements (from {chunked.op}) >= N*V = {n * v}"
    assert chunked.numel <= max(chunk * v, v * d, n * d), chunked.op
    # The recorder sees the full logits when they are built, so the check above is not vacuous.
    with LargestTensor() as full:
        linear_cross_entropy_reference(hidden, weight, labels, bias=b, reduction=reduction).sum().backward()
    assert full.numel >= n * v
