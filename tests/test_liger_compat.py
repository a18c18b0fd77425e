"""kernels.liger_compat against the installed liger-kernel itself: identical inputs into both, every option Liger's
fused linear cross-entropy and GRPO loss accept, outputs and gradients compared.

The cases follow Liger-Kernel's own test files (test/transformers/test_fused_linear_cross_entropy.py,
test/chunked_loss/test_grpo_loss.py), at smaller shapes: Liger's Triton kernels run in the interpreter on CPU (the
`triton` marker: TRITON_INTERPRET=1 set before triton is imported). Soft-capping is compared against PyTorch
instead, since Liger's softcap path needs libdevice's tanh, which the interpreter does not run.
"""
import inspect

import pytest
import torch

import kernels.liger_compat as compat
from tests import tolerances
from tests.closeness import assert_close

liger_ce = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy",
                               reason="liger-kernel (a dev extra) is the baseline these tests compare to")
liger_functional = pytest.importorskip("liger_kernel.transformers.functional")


def make_inputs(n, d, v, *, bias, seed=0, ignore_index=-100, ignore_frac=0.2, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * scale / d**0.5).requires_grad_()
    weight = torch.randn(v, d, generator=gen).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    return hidden, weight, b, target


def run(call, hidden, weight, bias, grad_rows=None):
    """Call, backpropagate (1.5 for a scalar loss, fixed per-row weights for "none"), return every output."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = call()
    loss = out.loss if isinstance(out, (compat.CrossEntropyOutput, liger_functional.CrossEntropyOutput)) else out
    if loss.dim() == 0:
        (loss * 1.5).backward()
    else:
        (loss * torch.linspace(-1.0, 2.0, loss.shape[0])).sum().backward()
    result = {"loss": loss.detach(), "d input": hidden.grad.clone(), "d weight": weight.grad.clone()}
    if bias is not None:
        result["d bias"] = bias.grad.clone()
    if loss is not out:
        for field in ("z_loss", "token_accuracy", "predicted_tokens"):
            result[field] = getattr(out, field)
    return result


def assert_same(ours, liger, length):
    """Two fp32 evaluations of the same chained reductions (matmul, log-sum-exp, loss, gradient matmul)."""
    assert ours.keys() == liger.keys()
    tol = tolerances.reduction_rtol(torch.float32, length, chain=4)
    for name, theirs in liger.items():
        mine = ours[name]
        if theirs is None:
            assert mine is None, name
            continue
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (name, mine.dtype, theirs.dtype)
        if name == "predicted_tokens":
            assert torch.equal(mine, theirs), name
            continue
        scale = theirs.detach().abs().max().item() if theirs.numel() else 0.0
        assert_close(mine.detach(), theirs.detach(), atol=tol * scale + tolerances.tiny_atol(torch.float32), rtol=tol,
                     name=name)


def test_signatures_match_liger():
    pairs = [(compat.LigerFusedLinearCrossEntropyLoss.__init__, liger_ce.LigerFusedLinearCrossEntropyLoss.__init__),
             (compat.LigerFusedLinearCrossEntropyLoss.forward, liger_ce.LigerFusedLinearCrossEntropyLoss.forward),
             (compat.liger_fused_linear_cross_entropy, liger_functional.liger_fused_linear_cross_entropy)]
    for ours, theirs in pairs:
        a, b = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        assert list(a) == list(b), ours.__qualname__
        assert [p.default for p in a.values()] == [p.default for p in b.values()], ours.__qualname__
    assert [f for f in compat.CrossEntropyOutput.__dataclass_fields__] == \
        [f for f in liger_functional.CrossEntropyOutput.__dataclass_fields__]


# Liger's test_correctness option sets (and those of its token-accuracy, predicted-tokens, token-scaling and
# structured-output tests), each under one reduction and bias setting, at 32 rows of Liger's (d, V) = (31, 123).
# Not here: soft-capping and class weights, which Liger's kernel cannot run in the interpreter (libdevice tanh; a
# Python float where its class-weight path calls .to): test_softcap_and_options_against_pytorch covers them.
MODULE_CASES = [
    ("plain", dict(), "mean", True),
    ("plain", dict(), "sum", False),
    ("plain", dict(), "none", True),
    ("non_default", dict(label_smoothing=0.1, ignore_index=42, lse_square_scale=1e-4, return_z_loss=True,
                         accum_dtype=torch.float32), "mean", True),
    ("non_default", dict(label_smoothing=0.1, ignore_index=42, lse_square_scale=1e-4, return_z_loss=True,
                         accum_dtype=torch.float32), "none", False),
    ("token_accuracy", dict(return_token_accuracy=True), "mean", True),
    ("token_accuracy", dict(return_token_accuracy=True), "none", False),
    ("predicted_tokens_ignore_2", dict(ignore_index=2, return_predicted_tokens=True), "mean", False),
    ("token_scaling", dict(use_token_scaling=True, return_z_loss=True, lse_square_scale=1e-2, label_smoothing=0.1),
     "mean", True),
    ("token_scaling", dict(use_token_scaling=True), "sum", False),
    ("token_scaling", dict(use_token_scaling=True, return_token_accuracy=True), "none", True),
    ("structured_all", dict(return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True), "sum",
     True),
]


@pytest.mark.triton
@pytest.mark.parametrize("case,kwargs,reduction,bias", MODULE_CASES,
                         ids=[f"{c[0]}-{c[2]}-{'bias' if c[3] else 'nobias'}" for c in MODULE_CASES])
def test_module_equals_liger(case, kwargs, reduction, bias):
    kwargs = dict(kwargs, reduction=reduction)
    n, d, v = 32, 31, 123
    hidden, weight, b, target = make_inputs(n, d, v, bias=bias, ignore_index=kwargs.get("ignore_index", -100))
    results = [run(lambda: cls(**kwargs)(weight, hidden, target, b), hidden, weight, b)
               for cls in (compat.LigerFusedLinearCrossEntropyLoss, liger_ce.LigerFusedLinearCrossEntropyLoss)]
    assert_same(*results, length=max(n, v))


@pytest.mark.triton
@pytest.mark.parametrize("shape,bias", [((4, 8, 8), True), ((63, 41, 41), False)])  # Liger's 2x2 and 9x7 rows
def test_functional_equals_liger(shape, bias):
    """Positional arguments in Liger's order (its class-weight cases: test_softcap_and_options_against_pytorch)."""
    n, d, v = shape
    hidden, weight, b, target = make_inputs(n, d, v, bias=bias, seed=1)
    w = None
    args = (b, w, -100, 1e-4, 0.0, "mean", None, True, None, False, True, True)  # positional, Liger's order
    results = [run(lambda: fn(hidden, weight, target, *args), hidden, weight, b)
               for fn in (compat.liger_fused_linear_cross_entropy, liger_functional.liger_fused_linear_cross_entropy)]
    assert_same(*results, length=max(n, v))


def test_softcap_and_options_against_pytorch():
    """Soft-capping (with class weights, token scaling and z-loss) against the options' formulas in PyTorch fp64."""
    n, d, v, cap = 37, 9, 53, 3.0
    hidden, weight, b, target = make_inputs(n, d, v, bias=True, seed=2)
    w = torch.rand(v, generator=torch.Generator().manual_seed(5)) + 0.5
    ours = run(lambda: compat.liger_fused_linear_cross_entropy(
        hidden, weight, target, b, w, softcap=cap, lse_square_scale=1e-2, use_token_scaling=True,
        return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True), hidden, weight, b)

    def formula():
        h, wt, bb = (t.double() for t in (hidden, weight, b))
        z = cap * torch.tanh((h @ wt.T + bb) / cap)
        valid = target != -100
        y = target.masked_fill(~valid, 0)
        logp = torch.log_softmax(z, 1)
        ce = -logp.gather(1, y[:, None]).squeeze(1)
        lse = torch.logsumexp(z, 1)
        zl = 1e-2 * lse**2 * valid
        s = logp.gather(1, y[:, None]).squeeze(1).exp().detach() * valid
        wy = w.double()[y] * valid
        loss = ((ce * wy / wy.sum() + zl / valid.sum()) * s).sum()
        pred = z.argmax(1).masked_fill(~valid, -1)
        return loss, (zl / valid.sum() * s).sum(), ((pred == target) & valid).sum() / valid.sum(), pred

    for t in (hidden, weight, b):
        t.grad = None
    loss, zl, acc, pred = formula()
    (loss * 1.5).backward()
    truth = {"loss": loss, "d input": hidden.grad, "d weight": weight.grad, "d bias": b.grad, "z_loss": zl,
             "token_accuracy": acc, "predicted_tokens": pred}
    tol = tolerances.reduction_rtol(torch.float32, max(n, v), chain=4)
    for name, t in truth.items():
        if name == "predicted_tokens":
            assert torch.equal(ours[name], t)
        else:
            assert_close(ours[name].double(), t.detach().double(), atol=tol * t.abs().max().item() + 1e-30, rtol=tol,
                         name=name)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ce_weight=torch.ones(5), label_smoothing=0.1), "ce_weight with label_smoothing"),
    (dict(accum_dtype=torch.bfloat16), "accum_dtype"),
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(softcap=0.0), "softcap"),
])
def test_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compat.LigerFusedLinearCrossEntropyLoss(**kwargs)


def test_functional_refusals():
    hidden, weight, b, target = make_inputs(4, 3, 5, bias=False)
    with pytest.raises(ValueError, match="chunk_mem_const"):
        compat.liger_fused_linear_cross_entropy(hidden, weight, target, chunk_mem_const=0)
    with pytest.raises(ValueError, match="return_z_loss"):
        compat.liger_fused_linear_cross_entropy(hidden, weight, target, return_z_loss=1)
    with pytest.raises(ValueError, match="ce_weight must"):
        compat.liger_fused_linear_cross_entropy(hidden, weight, target, None, torch.ones(4))
