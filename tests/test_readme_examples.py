"""The README's kernel examples run as written: each ```python block is executed on CPU (reference paths, small
shapes) and its loss, output and gradients checked, so the README cannot drift from the kernels' API."""

import math
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_shows_one_example_per_drop_in_kernel():
    names = ["fused_linear_cross_entropy", "varlen_attention", "fused_linear_grpo_loss",
             "LigerFusedLinearCrossEntropyLoss", "LigerFusedLinearGRPOLoss"]
    for name in names:
        assert any("import" in block and name in block for block in BLOCKS), f"no README example uses {name}"
    assert all(len(block.strip().splitlines()) <= 16 for block in BLOCKS), "README examples stay short"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(BLOCKS[index], f"README.md example {index + 1}", "exec"), scope)
    assert capsys.readouterr().out.strip(), "each example prints its result"
    tensors = [v for v in scope.values() if isinstance(v, torch.Tensor)]
    grads = [t.grad for t in tensors if t.is_leaf and t.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), "every input got a finite gradient"
    for name in ("loss", "out"):
        if isinstance(scope.get(name), torch.Tensor):
            assert torch.isfinite(scope[name]).all(), f"{name} is not finite"
            if name == "loss":
                assert math.isfinite(scope[name].item())
