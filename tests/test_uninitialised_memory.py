"""No kernel or matmul of the fused LM-head losses reads memory nobody wrote.

The bug this guards: `kernels.chunking.logits_buffer` pads each row of a chunk's logits to 16 elements and left
the padding uninitialised; a CPU bf16 matmul on that row-strided buffer read across the padding, and whatever
bits were there (sometimes NaN) reached d hidden as NaN rows, in the fused cross-entropy and the fused GRPO loss,
on some machines and some runs. Here the allocator is poisoned (every fresh buffer filled with NaN), and a
dispatch mode checks, for every matmul, the whole memory span its operands' strides cover (padding included,
what a blocked BLAS may touch), on any machine and every run. The results must also be finite and match the
same call without the poison.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.chunking as chunking
from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.grpo_fused_loss import fused_linear_grpo_loss

BACKENDS = ("reference", pytest.param("triton", marks=pytest.mark.triton))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.out,
            torch.ops.aten.addmm_.default, torch.ops.aten.mv.default, torch.ops.aten.dot.default}


def _span(t: torch.Tensor) -> torch.Tensor:
    """Every element between a tensor's first and last one in its storage (what its strides reach)."""
    length = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)
    return t.as_strided((length,), (1,), t.storage_offset())


class MatmulReadsChecker(TorchDispatchMode):
    """Fails when a matmul operand's memory span holds NaN (`addmm`'s `self` is skipped when beta = 0: BLAS does
    not read it then, documented by PyTorch, and the first chunk's d weight accumulator relies on that)."""

    def __init__(self):
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS:
            self.matmuls += 1
            operands = list(args)
            if func in (torch.ops.aten.addmm.default, torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default,
                        torch.ops.aten.baddbmm.default) and kwargs.get("beta", 1) == 0:
                operands = operands[1:]
            for i, t in enumerate(operands):
                if isinstance(t, torch.Tensor) and t.numel() and t.dtype.is_floating_point:
                    assert not torch.isnan(_span(t)).any(), (
                        f"{func}: operand {i} {tuple(t.shape)} strides {t.stride()} spans NaN (uninitialised memory)")
        return func(*args, **kwargs)


def _nan_rows(like, rows, stride):
    """Every chunk-logits buffer starts as NaN, as uninitialised memory may."""
    return torch.full((rows, stride), float("nan"), dtype=like.dtype, device=like.device)


def _inputs(dtype, n=23, v=123, d=12, seed=0):
    """V = 123 (not a multiple of 16: 5 padding elements per row); 23 rows in chunks of 8."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) / d**0.5).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


def _cross_entropy(hidden, weight, targets, backend):
    return fused_linear_cross_entropy(hidden, weight, targets, backend=backend, chunk_size=8)


def _grpo(hidden, weight, targets, backend):
    n = hidden.shape[0]
    gen = torch.Generator().manual_seed(1)
    seq = torch.arange(n) * 4 // n
    old = -torch.rand(n, generator=gen) * 5
    loss, _ = fused_linear_grpo_loss(hidden, weight, targets, old.to(hidden.dtype), torch.randn(4, generator=gen),
                                     seq, backend=backend, chunk_size=8, loss_type="grpo")
    return loss


def _run(loss_fn, dtype, backend, check):
    hidden, weight, targets = _inputs(dtype)
    checker = MatmulReadsChecker()
    if check:
        with checker:
            loss = loss_fn(hidden, weight, targets, backend)
            loss.backward()
        assert checker.matmuls > 0
    else:
        loss = loss_fn(hidden, weight, targets, backend)
        loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("loss_fn", [_cross_entropy, _grpo], ids=["cross_entropy", "grpo"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_matmul_reads_the_padding(loss_fn, dtype, backend, monkeypatch):
    plain = _run(loss_fn, dtype, backend, check=False)
    monkeypatch.setattr(chunking, "new_rows", _nan_rows)
    poisoned = _run(loss_fn, dtype, backend, check=True)
    for name, t in zip(("loss", "d hidden", "d weight"), poisoned):
        assert torch.isfinite(t).all(), f"{name} has non-finite entries"
    # The poison changes nothing: the same call on fresh buffers gives the same bits.
    for name, a, b in zip(("loss", "d hidden", "d weight"), poisoned, plain):
        assert torch.equal(a, b), name


def test_logits_buffer_padding_is_zero(monkeypatch):
    monkeypatch.setattr(chunking, "new_rows", _nan_rows)
    buf = chunking.logits_buffer(torch.empty(0, dtype=torch.bfloat16), 3, 123)
    padding = buf.as_strided((3, 5), (buf.stride(0), 1), 123)
    assert torch.equal(padding, torch.zeros_like(padding))
