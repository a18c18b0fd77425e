"""The allowed range of every numeric config field, as one table, and the one check that applies it.

A value outside its natural domain (a beta of 1.5, a timeout of 0, a group of one completion) is refused
when the config loads, with the key and the allowed range named, instead of failing in torch or in a
worker pool minutes later, or training on nothing. Every int and float field (and each item of a list
of numbers) must also be finite. `tests/test_config.py` checks that every numeric field of `Config` has a
row here (or is listed in `ANY_FINITE`) and that every row names a real field, so the table cannot drift
from the dataclasses.

Ranges are written as intervals, `[0, 1)`, or as one-sided bounds, `>= 1`, `> 0`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

from fastmath.errors import ConfigError

RANGES = {
    "run.seed": "[0, 4294967296)",  # numpy's seed must fit in 32 bits
    "run.dist_timeout_minutes": "(0, 10080]",
    "data.max_length": "> 0",
    "data.max_rows": ">= 0",
    "data.embedded_verbose_fraction": "[0, 1]",
    "optim.adam_beta1": "[0, 1)",
    "optim.adam_beta2": "[0, 1)",
    "optim.adam_eps": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.grad_clip": ">= 0",
    "parallel.replicate": "> 0",
    "checkpoint.save_every": ">= 0",
    "checkpoint.keep": "> 0",
    "heldout.num_problems": ">= 0",
    "heldout.max_new_tokens": "> 0",
    "heldout.batch_size": "> 0",
    "heldout.answer_timeout_s": "(0, 86400]",
    "sft.epochs": "> 0",
    "sft.max_steps": ">= 0",
    "sft.schedule_epochs": ">= 0",
    "sft.schedule_steps": ">= 0",
    "sft.tokens_per_micro_batch": "> 0",
    "sft.global_batch": "> 0",
    "sft.lr": "(0, 1)",
    "sft.min_lr_ratio": "[0, 1]",
    "sft.warmup_ratio": "[0, 1)",
    "sft.weight_decay": ">= 0",
    "sft.grad_clip": ">= 0",
    "model.lm_head_chunk_mib": ">= 0",
    "sft.log_every": "> 0",
    "sft.eval_every": ">= 0",
    "sft.save_every": ">= 0",
    "grpo.max_rows": ">= 0",
    "grpo.max_steps": "> 0",
    "grpo.schedule_steps": ">= -1",
    "grpo.loss.completions_per_micro_batch": ">= 0",
    "grpo.prompts_per_step": "> 0",
    "grpo.rollout.vllm_tensor_parallel_size": "> 0",
    "grpo.rollout.vllm_max_num_batched_tokens": "> 0",
    "grpo.rollout.num_generations": ">= 2",
    "grpo.rollout.max_prompt_length": "> 0",
    "grpo.rollout.max_completion_length": "> 0",
    "grpo.rollout.temperature": "> 0",
    "grpo.rollout.top_p": "(0, 1]",
    "grpo.rollout.min_p": "[0, 1)",
    "grpo.rollout.top_k": ">= 0",
    "grpo.rollout.vllm_gpu_memory_utilization": "(0, 1]",
    "grpo.rollout.vllm_cpu_kv_cache_gib": "> 0",
    "grpo.rollout.sync_bucket_mib": "> 0",
    "grpo.rollout.server_start_timeout_s": "> 0",
    "grpo.rollout.server_request_timeout_s": "> 0",
    "grpo.rollout.server_retries": ">= 0",
    "grpo.rollout.server_tensor_parallel_size": "> 0",
    "grpo.reward.cosine_max_length": ">= 0",
    "grpo.reward.overlong_buffer": ">= 0",
    "grpo.reward.reward_workers": "> 0",
    "grpo.reward.reward_timeout_s": "(0, 86400]",
    "grpo.loss.epsilon_low": "[0, 1)",
    "grpo.loss.epsilon_high": ">= 0",
    "grpo.loss.beta": ">= 0",
    "grpo.loss.num_iterations": "> 0",
    "grpo.loss.vllm_is_cap": ">= 1",
    "grpo.rollout.max_resample_rounds": ">= 0",
    "grpo.tokens_per_micro_batch": "> 0",
    "grpo.lr": "(0, 1)",
    "grpo.min_lr_ratio": "[0, 1]",
    "grpo.warmup_ratio": "[0, 1)",
    "grpo.weight_decay": ">= 0",
    "grpo.grad_clip": ">= 0",
    "grpo.max_bad_steps": "> 0",
    "grpo.log_every": "> 0",
    "grpo.save_every": ">= 0",
    "eval.max_problems": ">= 0",
    "eval.samples": "> 0",
    "eval.batch_size": "> 0",
    "eval.budgets": "> 0",
    "eval.temperature": ">= 0",
    "eval.top_p": "(0, 1]",
    "eval.min_p": "[0, 1)",
    "eval.top_k": ">= 0",
    "eval.tensor_parallel_size": "> 0",
    "eval.vllm_gpu_memory_utilization": "(0, 1]",
    "eval.vllm_cpu_kv_cache_gib": "> 0",
    "eval.answer_workers": "> 0",
    "eval.answer_timeout_s": "(0, 86400]",
    "scheduler.tiny_hidden_size": "> 0",
    "scheduler.tiny_layers": "> 0",
    "scheduler.tiny_heads": "> 0",
    "scheduler.max_length": "> 0",
    "scheduler.label_scale": "> 0",
    "scheduler.epochs": "> 0",
    "scheduler.batch_size": "> 0",
    "scheduler.lr": "> 0",
    "scheduler.weight_decay": ">= 0",
    "scheduler.val_fraction": "[0, 1)",
    "scheduler.margin_ratio": ">= 0",
    "scheduler.margin_tokens": ">= 0",
    "scheduler.min_budget": "> 0",
}

# Why a bound is where it is, where the range alone does not say it.
REASONS = {
    "run.dist_timeout_minutes": "at most a week; Python's timedelta overflows far above that",
    "heldout.answer_timeout_s": "seconds per answer check; the worker's alarm timer overflows far above a day",
    "grpo.reward.reward_timeout_s": "seconds per answer check; the worker's alarm timer overflows far above a day",
    "eval.answer_timeout_s": "seconds per answer check; the worker's alarm timer overflows far above a day",
    "grpo.rollout.num_generations": "a group of one completion has advantage 0, so GRPO would train on nothing",
    "grpo.rollout.temperature": "it divides the logits; for greedy decoding use the eval stage's temperature 0",
    "grpo.loss.vllm_is_cap": "it caps an importance weight whose unclipped value is 1 when sampler and trainer agree",
    "sft.lr": "AdamW moves each weight by about lr per step: 0 trains nothing, 1 is far too large",
    "grpo.lr": "AdamW moves each weight by about lr per step: 0 trains nothing, 1 is far too large",
}

# Numeric fields whose every finite value means something (signed reward values and weights).
ANY_FINITE = {"grpo.reward.reward_weights", "grpo.reward.cosine_correct", "grpo.reward.cosine_wrong"}


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        one_sided = re.fullmatch(r"(>=|>)\s*(\S+)", text)
        if one_sided:
            return cls(float(one_sided[2]), math.inf, one_sided[1] == ">=", False, text)
        both = re.fullmatch(r"([\[(])\s*([^,]+),\s*([^\])]+)([\])])", text)
        if not both:
            raise ValueError(f"not a range: {text!r}")
        return cls(float(both[2]), float(both[3]), both[1] == "[", both[4] == "]", text)

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self) -> str:
        return self.text if self.high == math.inf else f"in {self.text}"


INTERVALS = {key: Interval.parse(text) for key, text in RANGES.items()}


def numeric_values(config: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted key, shown key, value) for every int/float in the config (sub-sections such as grpo.loss walked),
    one per item of a list of numbers."""
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from numeric_values(value, key + ".")
            continue
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                yield key, key if i is None else f"{key}[{i}]", item


def check_ranges(config: Any) -> None:
    """Raise ConfigError naming the first numeric value that is not finite or outside its range."""
    for key, shown, value in numeric_values(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{shown}' must be a finite number, got {value}")
        interval = INTERVALS.get(key)
        if interval is not None and value not in interval:
            reason = f" ({REASONS[key]})" if key in REASONS else ""
            raise ConfigError(f"config key '{shown}' must be {interval.describe()}, got {value}{reason}")
