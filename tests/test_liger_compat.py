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


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_softcap_and_options_against_pytorch(label_smoothing):
    """Soft-capping with class weights (and Liger's class-weighted smoothing), token scaling and z-loss against the
    options' formulas in PyTorch fp64 (Liger's test_correctness "non-default" case, which its kernel cannot run in
    the interpreter)."""
    n, d, v, cap = 37, 9, 53, 3.0
    hidden, weight, b, target = make_inputs(n, d, v, bias=True, seed=2)
    w = torch.rand(v, generator=torch.Generator().manual_seed(5)) + 0.5
    ours = run(lambda: compat.liger_fused_linear_cross_entropy(
        hidden, weight, target, b, w, label_smoothing=label_smoothing, softcap=cap, lse_square_scale=1e-2,
        use_token_scaling=True, return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True,
        chunk_mem_const=2), hidden, weight, b)

    def formula():
        h, wt, bb = (t.double() for t in (hidden, weight, b))
        z = cap * torch.tanh((h @ wt.T + bb) / cap)
        valid = target != -100
        y = target.masked_fill(~valid, 0)
        logp = torch.log_softmax(z, 1)
        nll = -logp.gather(1, y[:, None]).squeeze(1)
        lse = torch.logsumexp(z, 1)
        zl = 1e-2 * lse**2 * valid
        s = logp.gather(1, y[:, None]).squeeze(1).exp().detach() * valid
        wy = w.double()[y] * valid
        ce = ((1 - label_smoothing) * wy * nll - label_smoothing / v * (w.double() * logp).sum(1)) * valid
        loss = ((ce / wy.sum() + zl / valid.sum()) * s).sum()
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


# --------------------------------------------------------------------------------------------------
# GRPO: LigerFusedLinearGRPOLoss (Liger's is PyTorch: compiled=False runs it on CPU without the interpreter)
# --------------------------------------------------------------------------------------------------

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")


def grpo_batch(b=3, t=47, d=31, v=123, seed=0, bias=False):
    """Liger's "random shape" (3, 47, 31, 123): policy and reference hidden states, masks with padding, old and
    reference log-probs near the policy's, advantages of both signs."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, t, d, generator=gen) / d**0.5).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * 2).requires_grad_()
    lin_bias = (torch.randn(v, generator=gen) * 0.1).requires_grad_() if bias else None
    ids = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 30:] = 0
    mask[1, :5] = 0
    with torch.no_grad():
        logits = (hidden @ weight.T + (0 if lin_bias is None else lin_bias))
        logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    return dict(
        _input=hidden, lin_weight=weight, selected_token_ids=ids, attention_mask=mask,
        advantages=torch.tensor([1.3, -0.7, 0.4][:b]), bias=lin_bias,
        ref_per_token_logps=logp + 0.1 * torch.randn(b, t, generator=gen),
        old_per_token_logps=logp + 0.25 * torch.randn(b, t, generator=gen),
        ref_input=(hidden.detach() + 0.05 * torch.randn(b, t, d, generator=gen)),
        ref_weight=weight.detach() + 0.05 * torch.randn(v, d, generator=gen),
        ref_bias=None if lin_bias is None else lin_bias.detach() * 0.9,
        vllm_is_ratio=0.8 + 0.4 * torch.rand(b, t, generator=gen),
    )


def run_grpo(module, batch, **drop):
    args = {k: v for k, v in batch.items() if k not in drop}
    leaves = [args["_input"], args["lin_weight"]] + ([args["bias"]] if args.get("bias") is not None else [])
    for x in leaves:
        x.grad = None
    loss, metrics = module(**args)
    (loss * 1.5).backward()
    return [loss.detach(), *[m.detach() for m in metrics], *[x.grad.clone() for x in leaves]], len(metrics)


# Liger's test_correctness grid, one case per (loss type, level), the other parameters rotated through its values:
# (beta, eps_low, eps_high, temperature), (use_ref_model, ref log-probs given, old log-probs given), delta, bias.
_SETTINGS = [(0.1, 0.2, 0.2, 1.0), (0.0, 0.1, 0.1, 2.0)]
_REFS = [(True, True, True), (True, False, False), (False, False, True)]
GRPO_CASES = [
    (loss_type, level, _SETTINGS[i % 2], _REFS[i % 3], (None, 2.0)[(i // 2) % 2], i % 3 == 1)
    for i, (loss_type, level) in enumerate(
        (lt, lv) for lt in ("bnpo", "grpo", "dr_grpo", "dapo", "cispo", "sapo") for lv in ("token", "sequence"))
    if not (level == "sequence" and loss_type in ("cispo", "sapo"))
] + [("luspo", "sequence", (0.0, 0.2, 0.2, 1.0), (False, False, True), None, False)]


@pytest.mark.parametrize("loss_type,level,settings,refs,delta,bias", GRPO_CASES)
def test_grpo_module_equals_liger(loss_type, level, settings, refs, delta, bias):
    beta, eps_low, eps_high, temperature = settings
    use_ref_model, give_ref, give_old = refs
    kwargs = dict(beta=beta, compiled=False, use_ref_model=use_ref_model, epsilon_low=eps_low, epsilon_high=eps_high,
                  loss_type=loss_type, max_completion_length=64, importance_sampling_level=level,
                  temperature=temperature, delta=delta)
    batch = grpo_batch(bias=bias)
    drop = {"vllm_is_ratio"} | ({"ref_per_token_logps"} if not give_ref else set()) | \
        ({"old_per_token_logps"} if not give_old else set())
    ours, n_ours = run_grpo(compat.LigerFusedLinearGRPOLoss(**kwargs), batch, **dict.fromkeys(drop))
    theirs, n_theirs = run_grpo(liger_grpo.LigerFusedLinearGRPOLoss(**kwargs), batch, **dict.fromkeys(drop))
    assert n_ours == n_theirs
    names = ["loss", *(["kl metric"] if n_ours == 2 else []), "clip metric", "d input", "d weight", "d bias"]
    # Two fp32 evaluations: the log-softmax over V, the sums over the batch's tokens, the gradient matmuls.
    tol = tolerances.reduction_rtol(torch.float32, 3 * 47 + 123, chain=4)
    for name, a, b in zip(names, ours, theirs):
        assert_close(a, b, atol=tol * b.abs().max().item() + tolerances.tiny_atol(torch.float32), rtol=tol, name=name)


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.1), ("cispo", 0.0), ("sapo", 0.1), ("grpo", 0.0)])
def test_grpo_module_vllm_is_ratio_and_bias_correction_equal_liger(loss_type, beta):
    """Liger's test_correctness_with_vllm_is_ratio ([B, T] and [B, 1] ratios) and, for dapo / grpo, its
    test_correctness_with_bias_correction_kl (token level), with num_items_in_batch."""
    batch = grpo_batch(seed=1)
    for ratio in (batch["vllm_is_ratio"], batch["vllm_is_ratio"][:, :1]):
        kwargs = dict(beta=beta, compiled=False, loss_type=loss_type, epsilon_high=3.0 if loss_type == "cispo" else 0.2,
                      use_bias_correction_kl=loss_type in ("dapo", "grpo"))
        args = dict(batch, vllm_is_ratio=ratio, num_items_in_batch=torch.tensor(150.0))
        ours, _ = run_grpo(compat.LigerFusedLinearGRPOLoss(**kwargs), args)
        theirs, _ = run_grpo(liger_grpo.LigerFusedLinearGRPOLoss(**kwargs), args)
        tol = tolerances.reduction_rtol(torch.float32, 3 * 47 + 123, chain=4)
        for a, b in zip(ours, theirs):
            assert_close(a, b, atol=tol * b.abs().max().item() + tolerances.tiny_atol(torch.float32), rtol=tol,
                         name=f"{loss_type}")


@pytest.mark.triton
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_grpo_module_triton_path_equals_liger(loss_type, level):
    """The adapter on the Triton path (interpreted), bias and reference model included."""
    batch = grpo_batch(b=2, t=13, bias=True)
    kwargs = dict(beta=0.1, compiled=False, loss_type=loss_type, importance_sampling_level=level, delta=2.0)
    ours, _ = run_grpo(compat.LigerFusedLinearGRPOLoss(**kwargs), batch, ref_per_token_logps=None)
    theirs, _ = run_grpo(liger_grpo.LigerFusedLinearGRPOLoss(**kwargs), batch, ref_per_token_logps=None)
    tol = tolerances.reduction_rtol(torch.float32, 2 * 13 + 123, chain=4)
    for a, b in zip(ours, theirs):
        assert_close(a, b, atol=tol * b.abs().max().item() + tolerances.tiny_atol(torch.float32), rtol=tol,
                     name=loss_type)


def test_grpo_signature_and_refusals():
    for name in ("__init__", "forward"):
        a = inspect.signature(getattr(compat.LigerFusedLinearGRPOLoss, name)).parameters
        b = inspect.signature(getattr(liger_grpo.LigerFusedLinearGRPOLoss, name)).parameters
        assert list(a) == list(b) and [p.default for p in a.values()] == [p.default for p in b.values()], name
    with pytest.raises(ValueError, match="vespo"):
        compat.LigerFusedLinearGRPOLoss(loss_type="vespo")
    batch = grpo_batch()
    with pytest.raises(ValueError, match="Sequence-level"):
        compat.LigerFusedLinearGRPOLoss(loss_type="cispo", importance_sampling_level="sequence")(**batch)
    with pytest.raises(ValueError, match="delta"):
        compat.LigerFusedLinearGRPOLoss(delta=1.1)(**batch)
    with pytest.raises(ValueError, match="luspo"):
        compat.LigerFusedLinearGRPOLoss(loss_type="luspo", beta=0.0)(**batch)
    # Liger's 4th positional argument is attention_mask: a [B, T] mask, not old log-probs.
    with pytest.raises(ValueError, match="attention_mask"):
        compat.LigerFusedLinearGRPOLoss()(batch["_input"], batch["lin_weight"], batch["selected_token_ids"],
                                          batch["old_per_token_logps"][:, :3], batch["advantages"])
