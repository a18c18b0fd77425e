"""fastmath kernels: drop-in fused kernels for LLM training (torch + triton; transformers only in `kernels.hf`).

Public API:
    fused_linear_cross_entropy   linear layer + cross-entropy without the [N, V] logits (kernels/cross_entropy.py)
    FusedLinearCrossEntropyLoss  Liger-Kernel's LigerFusedLinearCrossEntropyLoss, option for option
                                 (kernels/liger_compat.py, with Liger's functional form and GRPO module)
    (kernels.cross_entropy.cross_entropy: the non-fused cross-entropy for callers that already hold logits;
     not re-exported here, where its name would shadow the submodule `kernels.cross_entropy`)
    varlen_attention             packed-sequence (varlen) attention, flash-attn layout (kernels/attention.py)
    group_advantages, reward_sums, fused_linear_logprobs, grpo_loss, fused_linear_grpo_loss, GRPOStats,
    GroupAdvantages              GRPO: advantages, log-probs and the policy loss (kernels/grpo.py lists the files)

Backends (`backend=` of every kernel function): "auto" takes the Triton path for CUDA tensors, and for CPU
tensors while TRITON_INTERPRET=1 is set (set before triton and the kernel module are imported: Triton's
interpreter), the plain-PyTorch reference otherwise; "triton" and "reference" force a path (kernels/dispatch.py).

Dtypes, the same for every kernel function:
- fp16, bf16 and fp32 inputs run on both paths and are computed with fp32 accumulation; outputs come back in the
  input dtype (losses and statistics in fp32).
- float64 inputs run on the reference path only, computed in float64 end to end: that is what gradcheck and exact
  identity tests need. backend="auto" sends them there; backend="triton" refuses them with a ValueError that
  names the argument (GPUs' fp64 support varies and the kernels' accumulators are fp32, so a float64 answer from
  them would silently be no better than fp32).
- anything else (integers where floats are expected, complex, fp8) is refused.

The Hugging Face glue is imported explicitly (`import kernels.hf`) so that this package never imports
transformers.
"""

from kernels.attention import varlen_attention
from kernels.cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy
from kernels.liger_compat import LigerFusedLinearCrossEntropyLoss as FusedLinearCrossEntropyLoss

__all__ = ["CrossEntropyOutput", "FusedLinearCrossEntropyLoss", "fused_linear_cross_entropy", "varlen_attention"]
from kernels.grpo import (
    GroupAdvantages,
    GRPOStats,
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    group_advantages,
    grpo_loss,
    reward_sums,
)

__all__ += ["GRPOStats", "GroupAdvantages", "fused_linear_grpo_loss", "fused_linear_logprobs", "group_advantages",
            "grpo_loss", "reward_sums"]
