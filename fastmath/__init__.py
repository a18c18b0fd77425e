"""fastmath: the trainer (SFT then GRPO) for math-reasoning LLMs.

Entry point: `torchrun --nproc_per_node=N fastmath/train.py --config configs/<x>.yaml [key.sub=value ...]`.
The drop-in kernels live in the separate `kernels` package, which never imports this one.
"""
__version__ = "0.1.0"

import logging as _logging

# torchao (optim.name=adamw_8bit), which transformers imports whenever it is installed, registers enums with torch's
# pytree at import, and torch 2.13 logs a deprecation warning for each: a line of noise on every start that says
# nothing about the run. Quieted here, before anything imports transformers.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
