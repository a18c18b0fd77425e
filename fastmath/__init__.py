"""fastmath: the trainer (SFT then GRPO) for math-reasoning LLMs.

Entry point: `torchrun --nproc_per_node=N fastmath/train.py --config configs/<x>.yaml [key.sub=value ...]`.
The drop-in kernels live in the separate `kernels` package, which never imports this one.
"""
__version__ = "0.1.0"
