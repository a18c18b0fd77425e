"""GRPO in kernels: the public names of the three operations, each in a file of its own.

    kernels/grpo_advantages.py    group_advantages, reward_sums: group-relative advantages (GRPO / Dr. GRPO,
                                  TRL's scale_rewards), the batch std from sums all-reduced over ranks
    kernels/grpo_logprobs.py      fused_linear_logprobs: log-probs (and entropy) of the sampled tokens under
                                  the LM head without the [N, V] logits; the chunk loop the fused loss shares
    kernels/grpo_policy_loss.py   grpo_loss, GRPOStats: TRL 1.16's clipped policy loss on packed log-probs,
                                  token level (GRPO) or sequence level (GSPO)
    kernels/grpo_fused_loss.py    fused_linear_grpo_loss: log-probs and loss in one chunked pass (GSPO in two)
    kernels/grpo_inputs.py        the options / inputs records and the argument checks they all share
    kernels/trl_compat.py         TRL GRPOConfig options -> these functions' arguments (or a named refusal), TRL's
                                  entropy-quantile / off-policy masks as weights, TRL's per-sequence clip metrics
    kernels/liger_compat.py       Liger's LigerFusedLinearGRPOLoss (batch x time) over the fused loss

Every file reads in the house order (Triton kernels, PyTorch reference, launchers, autograd.Function, public
function) and its docstring holds the math. Each public function dispatches by `backend=` ("auto": Triton for
CUDA tensors or under TRITON_INTERPRET=1, PyTorch otherwise; kernels/dispatch.py) and follows one dtype policy:
fp16 / bf16 / fp32 on both paths with fp32 accumulation, float64 on the reference path only (computed in float64
end to end), refused by the Triton path with one ValueError.

GPU speed and memory of the Triton path are still to be measured (bench/bench_grpo.py; so far CPU only).
"""

from kernels.grpo_advantages import GroupAdvantages, group_advantages, group_advantages_reference, reward_sums
from kernels.grpo_fused_loss import fused_linear_grpo_loss, linear_grpo_loss_reference
from kernels.grpo_logprobs import fused_linear_logprobs, linear_logprobs_reference
from kernels.grpo_policy_loss import GRPOStats, grpo_loss, grpo_loss_reference

__all__ = [
    "GRPOStats",
    "GroupAdvantages",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "group_advantages",
    "group_advantages_reference",
    "grpo_loss",
    "grpo_loss_reference",
    "linear_grpo_loss_reference",
    "linear_logprobs_reference",
    "reward_sums",
]
