"""The memory planner: one optimizer step of a stage, simulated at the configured world size without a GPU.

    python fastmath/train.py --config configs/fast_math_r1_14b_sft.yaml --plan --gpu h100-80gb --gpus-per-node 8

What runs: the stage's model is built from its architecture (a local model folder's config.json, or the
published config shipped in fastmath/architectures/ for the hub ids the shipped configs name: no weights are
read or downloaded), wrapped exactly as the trainer wraps it (activation checkpointing, FSDP2 `fully_shard` per
decoder layer and on the root, mixed precision, HSDP when parallel.replicate > 1) over a fake process group of
the configured world size, given fake storage (`FakeTensorMode`: shapes and dtypes, no bytes), and driven through
two optimizer steps of rank 0: micro-batches of the configured token budget (forward, the fused LM-head loss,
backward with the configured gradient sync), gradient clipping and the configured optimizer. For GRPO also the
no-grad log-prob passes and the frozen reference model (beta > 0). On a GPU plan the kernels take their Triton
path (`kernels.dispatch.simulation`: the launches are skipped, the PyTorch allocations around them kept).

What is counted: every tensor storage alive at once on rank 0 (`fastmath.memory_tracker`), at the peak of the
second step (the first has no optimizer state yet), split by what it is: sharded parameters, gathered (unsharded)
parameters and their all-gather buffers, gradients, optimizer states, activations (saved for backward,
recomputed, temporaries), LM-head buffers (the fused loss's chunk of logits and its fp32 accumulators), the
reference model. Added from formulas: the colocated vLLM engine (its preallocated share while generating, the
rest while asleep), and the headroom the plan requires (10% of the GPU: the CUDA context, NCCL buffers and the
caching allocator's fragmentation, which no tensor shows).

A GRPO rank holds two states in turn: generating (the engine awake beside the trainer's resident tensors:
parameters, optimizer states, the reference) and updating (the training peak beside the sleeping engine).
The plan's peak is the larger.

Validated against real runs, not believed: bench/plan_validation.py runs a real 2-process step on the CPU,
measures its allocations with PyTorch's profiler and compares them with this planner's prediction for the same
config (bench/results/plan_validation-cpu.json).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastmath.config import Config
from fastmath.errors import ConfigError, ModelError
from fastmath.gpu_specs import GPUS, GiB, GPUSpec, gpu_spec

ARCHITECTURES = Path(__file__).parent / "architectures"
HEADROOM = 0.10  # of the GPU's memory, kept free (module docstring)
# Assumed for the step-time estimate: the fraction of peak bf16 FLOP/s the matmuls reach.
ASSUMED_MFU = 0.45
# What a sleeping (level 2) vLLM engine keeps: its CUDA graphs, allocator pools and context. Assumed, not
# measured here (no GPU): vLLM reports ~0.5-2 GiB of CUDA graph memory for 14B models.
VLLM_ASLEEP_BYTES = 2 * GiB

CATEGORIES = ("parameters", "gathered parameters", "gradients", "optimizer states", "activations",
              "LM-head buffers", "reference model", "vLLM engine")


# ---------------------------------------------------------------------------------------------
# Architecture


def architecture_config(name_or_path: str, trust_remote_code: bool = False):
    """The HF config of a model, offline: a local folder's config.json, or the shipped architecture file."""
    from transformers import AutoConfig

    if name_or_path == "embedded":
        from fastmath.embedded import ensure_embedded_assets

        name_or_path = str(ensure_embedded_assets().model_dir)
    folder = Path(name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    shipped = ARCHITECTURES / (name_or_path.replace("/", "--") + ".json")
    if not shipped.is_file():
        known = ", ".join(sorted(p.stem.replace("--", "/") for p in ARCHITECTURES.glob("*.json")))
        raise ModelError(f"no architecture for '{name_or_path}' to plan with: give a local model folder (its "
                         f"config.json is enough), or one of the shipped architectures: {known}")
    facts = {k: v for k, v in json.loads(shipped.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(facts.pop("model_type"), **facts)


def planned_model_name(config: Config, stage: str) -> str:
    """Which model a stage trains, for planning: its start point when that names an architecture (a local folder
    or a known hub id), else model.name_or_path (an SFT export that does not exist yet has its base's shape)."""
    if stage == "grpo" and config.grpo.init_from != "auto":
        start = config.grpo.init_from
        if (Path(start).expanduser() / "config.json").is_file() or \
                (ARCHITECTURES / (start.replace("/", "--") + ".json")).is_file():
            return start
    return config.model.name_or_path


# ---------------------------------------------------------------------------------------------
# The simulated step


@dataclass
class StagePlan:
    stage: str
    model: str
    parameters: int
    world_size: int
    micro_batches: int            # per rank per optimizer step
    tokens_per_micro_batch: int
    train_peak: dict[str, int]    # bytes alive at the training peak, by category (no engine)
    resident: dict[str, int]      # bytes alive between steps (what a generating rank keeps beside the engine)
    engine_awake: int = 0
    engine_asleep: int = 0
    engine: object = None         # fastmath.vllm_budget.EngineBudget of the colocated engine, when there is one
    work: dict[str, float] = field(default_factory=dict)          # FLOPs and bytes of one step (`step_work`)
    step_seconds: dict[str, float] = field(default_factory=dict)  # their estimated time on the planned GPU
    simulated_seconds: float = 0.0

    @property
    def peak(self) -> dict[str, int]:
        """The larger of the two GRPO states (module docstring), by category."""
        updating = dict(self.train_peak, **{"vLLM engine": self.engine_asleep}) if self.engine_awake else \
            dict(self.train_peak)
        generating = dict(self.resident, **{"vLLM engine": self.engine_awake})
        return updating if sum(updating.values()) >= sum(generating.values()) or not self.engine_awake \
            else generating

    @property
    def peak_bytes(self) -> int:
        return sum(self.peak.values())


@contextmanager
def fake_process_group(world_size: int):
    """A fake default process group of `world_size` ranks (this process is rank 0): collectives return at once."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("the memory planner needs a process without a process group (run --plan on its own)")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _meta_model(arch, attn_implementation: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if attn_implementation == "fastmath_varlen":
        from kernels.hf import register

        register()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch, dtype=dtype, attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model


@contextmanager
def _lm_head_labelled(tracker):
    """Label what the fused LM-head losses allocate (their modules call them by these names)."""
    import fastmath.model as model_module
    import fastmath.policy as policy_module

    originals = {(model_module, "fused_linear_cross_entropy"): model_module.fused_linear_cross_entropy,
                 (policy_module, "fused_linear_grpo_loss"): policy_module.fused_linear_grpo_loss,
                 (policy_module, "fused_linear_logprobs"): policy_module.fused_linear_logprobs}

    def labelled(function):
        def call(*args, **kwargs):
            with tracker.phase("LM-head buffers"):
                return function(*args, **kwargs)
        return call

    for (module, name), function in originals.items():
        setattr(module, name, labelled(function))
    try:
        yield
    finally:
        for (module, name), function in originals.items():
            setattr(module, name, function)


def _sft_batches(config: Config):
    """The worst-case micro-batch: one packed row filled to the token budget with documents of data.max_length."""
    from fastmath.packing import collate_packed

    budget, longest = config.sft.tokens_per_micro_batch, min(config.data.max_length, config.sft.tokens_per_micro_batch)
    lengths = [longest] * (budget // longest) + ([budget % longest] if budget % longest else [])
    docs = [([1] * n, [True] * n) for n in lengths]
    return collate_packed(docs)


def _grpo_batch(config: Config):
    """The worst-case update row: completions of max_completion_length after prompts of max_prompt_length, as
    many as a row holds (grpo.loss.completions_per_micro_batch, or as fit the token budget)."""
    from fastmath.policy import Sequence, pack_sequences

    g = config.grpo
    prompt, completion = g.rollout.max_prompt_length, g.rollout.max_completion_length
    per_row = g.loss.completions_per_micro_batch or max(1, g.tokens_per_micro_batch // (prompt + completion))
    seqs = [Sequence([1] * prompt, [1] * completion, [0.0] * completion, 1.0, True) for _ in range(per_row)]
    (batch,) = pack_sequences(seqs, budget=per_row * (prompt + completion), per_row=per_row)
    return batch, per_row


def _grpo_rows_per_rank(config: Config, world: int, per_row: int) -> int:
    g = config.grpo
    completions = math.ceil(g.prompts_per_step / world) * g.rollout.num_generations
    return math.ceil(completions / per_row)


def simulate_stage(config: Config, stage: str, world_size: int, gpu: bool, progress=None) -> StagePlan:
    """Rank 0's memory over two optimizer steps of `stage` (module docstring); needs a process without a group."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmath.grpo_stage import release_gathered
    from fastmath.memory_tracker import MemoryTimeline
    from fastmath.model import CausalLMWithLinearLoss, count_parameters, lm_head_chunk_bytes, parallelize
    from fastmath.policy import PolicyWithGRPOLoss, grpo_loss_options
    from fastmath.stage import build_optimizer, clip_gradients, micro_batches, optim_settings
    from kernels.dispatch import simulation

    started = time.perf_counter()
    name = planned_model_name(config, stage)
    arch = architecture_config(name, config.model.trust_remote_code)
    m, device = config.model, torch.device("cpu")
    bf16 = m.precision == "bf16" or (m.precision == "auto" and gpu)
    chunk_bytes = lm_head_chunk_bytes(m)
    g = config.grpo
    if stage == "sft":
        def wrap(lm):
            return CausalLMWithLinearLoss(lm, chunk_bytes)
        batch = _sft_batches(config)
        n_micro = config.sft.global_batch // world_size
    else:
        loss_options = grpo_loss_options(g)

        def wrap(lm):
            return PolicyWithGRPOLoss(lm, g.rollout.temperature, loss_options, chunk_bytes)
        batch, per_row = _grpo_batch(config)
        n_micro = _grpo_rows_per_rank(config, world_size, per_row)
    tokens = batch.num_tokens if stage == "sft" else batch.packed.num_tokens

    with fake_process_group(world_size):
        causal_lm = _meta_model(arch, m.attn_implementation, torch.float32)
        params = count_parameters(causal_lm)
        model = parallelize(wrap(causal_lm), world_size, device, m.activation_checkpointing, False, bf16,
                            config.parallel.replicate)
        ref_model = None
        if stage == "grpo" and g.loss.beta > 0:
            ref_lm = _meta_model(arch, m.attn_implementation, torch.bfloat16 if bf16 else torch.float32)
            ref_lm.requires_grad_(False)
            ref_model = parallelize(wrap(ref_lm), world_size, device, False, False, bf16, config.parallel.replicate)
        tracker = MemoryTimeline()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        simulate = simulation("cuda" if gpu else "cpu")
        with FakeTensorMode(allow_non_fake_inputs=True), simulate, tracker, _lm_head_labelled(tracker):
            model.to_empty(device=device)
            if world_size == 1:  # to_empty gives each use of a tied parameter its own tensor; FSDP keeps the tie
                causal_lm.tie_weights()
            tracker.adopt([p for p in model.parameters()], "parameters")
            if ref_model is not None:
                ref_model.to_empty(device=device)
                if world_size == 1:
                    ref_lm.tie_weights()
                tracker.adopt([p for p in ref_model.parameters()], "reference model")
            optimizer = build_optimizer(model, optim_settings(config, stage))
            trainable = [p for p in model.parameters() if p.requires_grad]
            resident = {}
            # Step 1 only creates the optimizer states (zero gradients, one optimizer step: what a real first step
            # leaves behind, without its forward and backward); step 2 is the steady state. Its micro-batches after
            # the second repeat the second's allocations exactly (gradients accumulate in place into what the
            # first created), so two of them stand for all n.
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            tracker.adopt(_optimizer_tensors(optimizer), "optimizer states")
            optimizer.zero_grad(set_to_none=True)
            if progress:
                progress.update(1)
            resident = _live_by_category(tracker, model, ref_model, optimizer)
            tracker.reset_peak()
            _one_step(stage, model, ref_model, batch, min(n_micro, 2), world_size, config, autocast, tracker,
                      micro_batches, n_micro, release_gathered)
            with tracker.phase("optimizer states"):
                clip_gradients(trainable, optim_settings(config, stage))
                optimizer.step()
            tracker.adopt(_optimizer_tensors(optimizer), "optimizer states")
            if progress:
                progress.update(1)
            breakdown = tracker.peak_breakdown(_classifier(model, ref_model, optimizer))
            optimizer.zero_grad(set_to_none=True)
    train_peak = {c: breakdown.get(c, 0) for c in CATEGORIES if c != "vLLM engine"}
    for extra, value in breakdown.items():  # any label outside the categories (should be none) stays visible
        if extra not in train_peak:
            train_peak["activations"] += value
    plan = StagePlan(stage, name, params["total"], world_size, n_micro, tokens, train_peak, resident)
    plan.simulated_seconds = time.perf_counter() - started
    plan.work = step_work(config, stage, arch, params, world_size, n_micro, batch)
    return plan


def _one_step(stage, model, ref_model, batch, n_micro, world, config, autocast, tracker, micro_batches,
              configured_micro, release_gathered):
    """The stage's micro-batches on rank 0: forward, loss, backward (and GRPO's no-grad passes first); n_micro of
    them, but the loss is normalised as for the configured count (`tokens`, `seqs`)."""
    batches = [batch] * n_micro
    g = config.grpo
    if stage == "grpo":
        need_old = g.loss.num_iterations > 1 or g.loss.vllm_is_correction
        with torch.no_grad(), autocast:
            for b in batches:
                if need_old:
                    with tracker.phase("activations"):
                        b.old_logprobs = model(b, mode="logprobs")[0].float()
                if ref_model is not None:
                    with tracker.phase("reference model"):
                        b.ref_logprobs = ref_model(b, mode="logprobs")[0].float()
                        release_gathered(ref_model)
        tokens = float(batch.mask.numel()) * configured_micro * world
        seqs = float(batch.num_sequences * configured_micro * world)
    for _, b in micro_batches(model, batches, config.parallel.gradient_sync):
        with tracker.phase("activations"):
            with autocast:
                if stage == "sft":
                    loss = model(b)
                else:
                    loss, _ = model(b, num_items_in_batch=tokens, num_sequences=seqs)
            loss.backward()
            del loss
        # What the micro-batch allocated and still holds once its graph is gone is gradient: the sharded gradients,
        # or with gradient_sync=step FSDP's accumulated unsharded ones (kept outside .grad until the reduction).
        tracker.relabel_live("activations", "gradients")
        tracker.adopt([p.grad for p in model.parameters() if p.grad is not None], "gradients")


def _optimizer_tensors(optimizer):
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def _storage_set(tensors) -> set[int]:
    from fastmath.memory_tracker import storages_of

    return {id(s) for t in tensors if t is not None for s in storages_of(t)}


def _classifier(model, ref_model, optimizer):
    params = _storage_set(model.parameters())
    grads = _storage_set(p.grad for p in model.parameters())
    states = _storage_set(_optimizer_tensors(optimizer))
    ref = _storage_set(ref_model.parameters()) if ref_model is not None else set()

    def classify(storage):
        key = id(storage)
        return ("parameters" if key in params else "gradients" if key in grads else
                "optimizer states" if key in states else "reference model" if key in ref else None)
    return classify


def _live_by_category(tracker, model, ref_model, optimizer) -> dict[str, int]:
    """What stays allocated between steps (parameters, optimizer states, the reference), by category."""
    classify = _classifier(model, ref_model, optimizer)
    out = {c: 0 for c in CATEGORIES if c != "vLLM engine"}
    for entry in tracker.live.values():
        storage = entry.ref()
        category = (classify(storage) if storage is not None else None) or entry.label
        out[category if category in out else "activations"] += entry.bytes
    return out


# ---------------------------------------------------------------------------------------------
# Time, from FLOPs and bytes (an estimate at stated rates)


def step_work(config: Config, stage: str, arch, params: dict, world: int, n_micro: int, batch) -> dict[str, float]:
    """What one optimizer step of rank 0 does: matmul FLOPs, FSDP bytes moved, optimizer bytes touched (`timing`
    turns them into seconds at a GPU's rates)."""
    from fastmath.metrics import attention_dims, training_flops

    layers, d_attn = attention_dims(arch)
    if stage == "sft":
        lengths, tokens = batch.doc_lengths, batch.num_tokens
    else:
        lengths, tokens = batch.packed.doc_lengths, batch.packed.num_tokens
    forward_and_backward = training_flops(params["matmul"], tokens, lengths, layers, d_attn) * n_micro
    train = forward_and_backward
    if config.model.activation_checkpointing:  # the forward again in backward: +1/3 of the training FLOPs
        train *= 4 / 3
    extra = 0.0
    if stage == "grpo":
        forward = forward_and_backward / 3
        loss = config.grpo.loss
        passes = (loss.beta > 0) + (loss.num_iterations > 1 or loss.vllm_is_correction)
        extra = forward * passes
        train *= config.grpo.loss.num_iterations
    # FSDP traffic per rank and micro-batch: all-gather bf16 parameters in forward and again in backward
    # (2 bytes each, twice), reduce-scatter fp32 gradients (4 bytes); each moves (W - 1) / W of the bytes.
    share = (world - 1) / world
    fsdp_bytes = n_micro * params["total"] * (2 * 2 + 4) * share
    return {"flops": train + extra, "fsdp_bytes": fsdp_bytes, "optimizer_bytes": params["total"] / world * 16 * 2}


def timing(plan: StagePlan, spec: GPUSpec, config: Config) -> dict[str, float]:
    """Estimated seconds (not measured): matmuls at ASSUMED_MFU of peak; FSDP traffic over NVLink overlapped with
    them (the larger counts); the optimizer's pass over its states at HBM bandwidth; for GRPO, generation as
    decode steps that each read the engine's weights once (a bandwidth floor for one sequence batch)."""
    s = plan.work
    if not spec.bf16_flops:  # a GPU known only by its memory (a run's own check): no rates, no estimate
        return {}
    compute = s["flops"] / (spec.bf16_flops * ASSUMED_MFU)
    comm = s["fsdp_bytes"] / spec.link_bytes_per_s
    out = {"update": max(compute, comm) + s["optimizer_bytes"] / spec.hbm_bytes_per_s}
    if plan.stage == "grpo":
        tp = config.grpo.rollout.vllm_tensor_parallel_size
        out["generate"] = config.grpo.rollout.max_completion_length * (2 * plan.parameters / tp) / spec.hbm_bytes_per_s
    return out


# ---------------------------------------------------------------------------------------------
# The engine


def engine_share(config: Config, spec: GPUSpec, arch, world: int):
    """The colocated vLLM engine on one GPU (`fastmath.vllm_budget`, vLLM's own accounting): (bytes while
    generating = its preallocated share, bytes asleep = what sleep level 2 keeps, the EngineBudget)."""
    from fastmath.vllm_budget import engine_budget

    g = config.grpo
    tp = g.rollout.vllm_tensor_parallel_size
    # A tensor-parallel engine generates for every rank of its group: tp ranks' prompts, each G completions.
    sequences = g.rollout.num_generations * math.ceil(g.prompts_per_step / world) * tp
    length = g.rollout.max_prompt_length + g.rollout.max_completion_length
    budget = engine_budget(arch, gpu_bytes=spec.memory_bytes,
                           gpu_memory_utilization=g.rollout.vllm_gpu_memory_utilization,
                           tensor_parallel_size=tp, max_model_len=length, sequences=sequences, sequence_tokens=length,
                           enforce_eager=g.rollout.vllm_enforce_eager,
                           max_num_batched_tokens=g.rollout.vllm_max_num_batched_tokens)
    asleep = budget.overhead if g.rollout.vllm_sleep else budget.budget
    return budget.budget, asleep, budget


# ---------------------------------------------------------------------------------------------
# The whole plan


@dataclass
class Plan:
    config_path: str
    gpu: str
    spec: GPUSpec
    nodes: int
    gpus_per_node: int
    stages: list[StagePlan]

    def fits(self, stage: StagePlan) -> bool:
        """The peak leaves the headroom free, and a colocated engine starts (its KV cache holds one sequence)."""
        engine_ok = stage.engine is None or stage.engine.starts
        return engine_ok and stage.peak_bytes <= (1 - HEADROOM) * self.spec.memory_bytes


def plan_config(config: Config, config_path: str, gpu: str | GPUSpec, nodes: int, gpus_per_node: int,
                show_progress: bool = True) -> Plan:
    """Simulate every training stage of `config` at nodes x gpus_per_node ranks on `gpu` (a `gpu_specs` key or a
    GPUSpec, e.g. the one a run reads off its device)."""
    from tqdm import tqdm

    spec = gpu if isinstance(gpu, GPUSpec) else gpu_spec(gpu)
    gpu = gpu if isinstance(gpu, str) else spec.name
    world = nodes * gpus_per_node
    stages = [s for s in config.run.stages if s in ("sft", "grpo")]
    if not stages:
        raise ConfigError("the memory plan covers the training stages (sft, grpo); run.stages has none")
    plans = []
    bar = tqdm(total=2 * len(stages), desc="planning", unit="step", disable=not show_progress, leave=False)
    for stage in stages:
        _check_divisible(config, stage, world)
        plan = simulate_stage(config, stage, world, gpu=True, progress=bar)
        arch = architecture_config(plan.model, config.model.trust_remote_code)
        colocated = config.grpo.rollout.vllm_mode == "colocate" and config.grpo.rollout.generator != "hf"
        if stage == "grpo" and colocated:  # server mode: the engines live on their own GPUs
            plan.engine_awake, plan.engine_asleep, plan.engine = engine_share(config, spec, arch, world)
        plan.step_seconds = timing(plan, spec, config)
        plans.append(plan)
    bar.close()
    return Plan(config_path, gpu, spec, nodes, gpus_per_node, plans)


def _check_divisible(config: Config, stage: str, world: int) -> None:
    if stage == "sft" and config.sft.global_batch % world:
        raise ConfigError(f"sft.global_batch ({config.sft.global_batch}) must be a multiple of the {world} "
                          f"planned ranks")
    if config.parallel.replicate > 1 and world % config.parallel.replicate:
        raise ConfigError(f"parallel.replicate ({config.parallel.replicate}) must divide the {world} planned ranks")


def format_plan(plan: Plan) -> str:
    """The plan as a table: one row per stage, GiB per category at the peak, the total against the GPU."""
    short = {"parameters": "params", "gathered parameters": "gathered", "gradients": "grads",
             "optimizer states": "optim", "activations": "activ.", "LM-head buffers": "LM head",
             "reference model": "ref", "vLLM engine": "vLLM"}
    usable = (1 - HEADROOM) * plan.spec.memory_bytes
    world = plan.nodes * plan.gpus_per_node
    lines = [f"memory plan: {plan.config_path} on {plan.nodes} node(s) x {plan.gpus_per_node} {plan.spec.name} "
             f"({world} ranks); per-rank peak in GiB (fits = at most {usable / GiB:.1f} GiB: "
             f"{100 * (1 - HEADROOM):.0f}% of {plan.spec.memory_bytes / GiB:.1f})",
             "| stage | " + " | ".join(short[c] for c in CATEGORIES) + " | peak | fits | est. step (s) |",
             "|---" * (len(CATEGORIES) + 5) + "|"]
    for s in plan.stages:
        cells = " | ".join(f"{s.peak.get(c, 0) / GiB:.1f}" for c in CATEGORIES)
        times = ", ".join(f"{k} {v:.0f}" for k, v in s.step_seconds.items()) or "n/a"
        lines.append(f"| {s.stage} | {cells} | {s.peak_bytes / GiB:.1f} | {'yes' if plan.fits(s) else 'NO'} | "
                     f"{times} |")
    for s in plan.stages:
        lines.append(f"{s.stage}: {s.model}, {s.parameters / 1e9:.2f} B parameters; {s.micro_batches} "
                     f"micro-batch(es) of {s.tokens_per_micro_batch} tokens per rank; simulated in "
                     f"{s.simulated_seconds:.0f} s" + (f"; {engine_note(s.engine)}" if s.engine else ""))
    lines.append(f"Step times are estimates (not measured): matmuls at {ASSUMED_MFU:.0%} of "
                 f"{plan.spec.bf16_flops / 1e12:.0f} TFLOP/s bf16, FSDP traffic at {plan.spec.link_bytes_per_s / 1e9:.0f}"
                 f" GB/s overlapped, generation as one weight read per decoded token at "
                 f"{plan.spec.hbm_bytes_per_s / 1e12:.2f} TB/s (a floor).")
    return "\n".join(lines)


def engine_note(engine) -> str:
    """One line on the colocated engine's KV cache against what the step's sequences need."""
    if not engine.starts:
        return (f"vLLM cannot start: its share leaves {engine.kv_available / GiB:.1f} GiB for the KV cache, less "
                f"than one {engine.max_model_len}-token sequence")
    verdict = "holds every sequence" if engine.fits else "preempts (the sequences take turns)"
    return (f"vLLM KV cache {engine.kv_tokens / 1e3:.0f}k tokens for {engine.kv_tokens_needed / 1e3:.0f}k in "
            f"flight: {verdict}")


def plan_summary(plan: Plan, problems: list[str]) -> dict:
    """The plan as plain values (the `--json` line, and bench/memory_plans.py's record)."""
    return {"config": plan.config_path, "gpu": plan.spec.name, "gpu_bytes": plan.spec.memory_bytes,
            "nodes": plan.nodes, "gpus_per_node": plan.gpus_per_node, "problems": problems,
            "peaks": {s.stage: s.peak_bytes for s in plan.stages},
            "stages": [{"stage": s.stage, "model": s.model, "parameters": s.parameters, "peak_bytes": s.peak_bytes,
                        "by_category": {c: s.peak.get(c, 0) for c in CATEGORIES}, "fits": plan.fits(s),
                        "micro_batches": s.micro_batches, "tokens_per_micro_batch": s.tokens_per_micro_batch,
                        "estimated_seconds": s.step_seconds, "simulated_seconds": round(s.simulated_seconds, 1),
                        "engine": engine_note(s.engine) if s.engine else None} for s in plan.stages]}


def largest_terms(plan: Plan, stage: StagePlan, n: int = 3) -> str:
    terms = sorted(stage.peak.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {value / GiB:.1f} GiB" for name, value in terms)


# ---------------------------------------------------------------------------------------------
# The configs' GPUs, the command line, and a run's own check


HEADER_GPUS = re.compile(r"^#\s*GPUs:\s*(\d+)\s*nodes?\s*x\s*(\d+)\s*x?\s*([a-z0-9-]+)", re.IGNORECASE | re.MULTILINE)


def header_gpus(config_path: str) -> tuple[int, int, str] | None:
    """(nodes, GPUs per node, gpu_specs key) from a config's `# GPUs: 1 node x 8 h100-80gb` header line."""
    try:
        text = Path(config_path).read_text()
    except OSError:
        return None
    match = HEADER_GPUS.search(text)
    return (int(match.group(1)), int(match.group(2)), match.group(3).lower()) if match else None


def not_fitting_message(plan: Plan, stage: StagePlan) -> str:
    """One line: which stage does not fit, its largest terms, and the fixes that act on them."""
    need, have = stage.peak_bytes / GiB, (1 - HEADROOM) * plan.spec.memory_bytes / GiB
    if stage.engine is not None and not stage.engine.starts:
        return (f"the {stage.stage} stage's vLLM engine cannot start on {plan.spec.name}: "
                f"{engine_note(stage.engine)}; raise grpo.rollout.vllm_gpu_memory_utilization or use tensor "
                f"parallelism")
    return (f"the {stage.stage} stage needs {need:.1f} GiB per GPU, more than the {have:.1f} GiB usable on "
            f"{plan.spec.name} (largest: {largest_terms(plan, stage)}); fix: more GPUs, a smaller token budget per "
            f"micro-batch, model.activation_checkpointing=true, optim.name=adamw_8bit, or a smaller "
            f"grpo.rollout.vllm_gpu_memory_utilization (python fastmath/train.py --config X --plan shows each term)")


def run_check(config_path: str | None, overrides: list[str], world: int, local_world: int) -> None:
    """A CUDA run's check before it loads anything: rank 0 plans the configured step for this machine's GPU (in a
    subprocess: the plan needs a process without a process group) and raises ConfigError when it cannot fit."""
    import subprocess
    import sys

    props = torch.cuda.get_device_properties(0)
    spec = next((dataclasses.replace(s, memory_bytes=props.total_memory) for s in GPUS.values()
                 if s.name.split()[1] in props.name), GPUSpec(props.name, props.total_memory, 0.0, 1.0, 1.0))
    command = [sys.executable, "-m", "fastmath.planner", "--json", "--gpu-bytes", str(spec.memory_bytes),
               "--gpu-name", spec.name, "--nodes", str(max(1, world // local_world)),
               "--gpus-per-node", str(local_world)]
    command += (["--config", config_path] if config_path else []) + list(overrides)
    done = subprocess.run(command, capture_output=True, text=True)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode == 2 and "no architecture for" in last:
        # A hub model with no local config and none shipped: nothing to plan from offline. Say so, and run.
        print(f"fastmath: note: memory plan skipped ({last.removeprefix('fastmath: error: ')})", flush=True)
        return
    if done.returncode not in (0, 1):
        raise ConfigError(f"the memory plan failed before the run (skip it with parallel.memory_check=false): "
                          f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    if verdict["problems"]:
        raise ConfigError(verdict["problems"][0] + " (parallel.memory_check=false skips this check)")


def main(argv: list[str] | None = None) -> int:
    """`python -m fastmath.planner`: the plan of `fastmath/train.py --plan`, or (--json) one verdict line."""
    import argparse
    import sys

    from fastmath.config import load_config
    from fastmath.errors import FastmathError

    parser = argparse.ArgumentParser(prog="python -m fastmath.planner")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    add_plan_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON verdict line (for a run's own check)")
    parser.add_argument("--gpu-bytes", type=int, help="plan for a GPU of this many bytes (with --gpu-name)")
    parser.add_argument("--gpu-name", default="this GPU")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        gpu = GPUSpec(args.gpu_name, args.gpu_bytes, 0.0, 1.0, 1.0) if args.gpu_bytes else None
        return print_plan(config, args.config, args, gpu=gpu, as_json=args.json)
    except FastmathError as err:
        print(f"fastmath: error: {err}", file=sys.stderr, flush=True)
        return 2


def add_plan_arguments(parser) -> None:
    parser.add_argument("--gpu", help=f"plan for this GPU ({', '.join(GPUS)}); default: the config's '# GPUs:' "
                        "header line")
    parser.add_argument("--nodes", type=int, help="nodes (default: the header's, else 1)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the header's, else 8)")


def print_plan(config: Config, config_path: str | None, args, gpu: GPUSpec | None = None,
               as_json: bool = False) -> int:
    """Plan, print the table (or one JSON line), return 0 when every stage fits and 1 otherwise."""
    header = header_gpus(config_path) if config_path else None
    nodes = args.nodes or (header[0] if header else 1)
    per_node = args.gpus_per_node or (header[1] if header else 8)
    chosen = gpu or args.gpu or (header[2] if header else None)
    if chosen is None:
        raise ConfigError("name the GPU to plan for with --gpu (one of: " + ", ".join(GPUS) + "), or give the "
                          "config a '# GPUs: 1 node x 8 h100-80gb' header line")
    plan = plan_config(config, config_path or "(defaults)", chosen, nodes, per_node, show_progress=not as_json)
    problems = [not_fitting_message(plan, s) for s in plan.stages if not plan.fits(s)]
    if as_json:
        print(json.dumps(plan_summary(plan, problems)))
    else:
        print(format_plan(plan))
        for problem in problems:
            print(f"does not fit: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
