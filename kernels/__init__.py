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
