"""fastmath kernels: drop-in fused kernels for LLM training (torch + triton; transformers only in `kernels.hf`).

Public functions:
    fused_linear_cross_entropy  linear layer + cross-entropy without the [N, V] logits (kernels/cross_entropy.py)
    varlen_attention            packed-sequence (varlen) causal attention, flash-attn layout (kernels/attention.py)

The Hugging Face glue is imported explicitly (`import kernels.hf`) so that this package never imports
transformers.
"""

from kernels.attention import varlen_attention
from kernels.cross_entropy import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy", "varlen_attention"]
