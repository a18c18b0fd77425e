"""Stage 2: GRPO with colocated vLLM rollouts, math rewards and padding-free packed policy updates.

One step, on every rank (each rank owns its share of the prompts and its own generator):
    prompts -> G completions each (vLLM, or HF generate) -> rewards (answer check in a worker pool, format,
    length) -> group advantages (`kernels.grpo.group_advantages`) -> [dynamic sampling: drop groups whose
    rewards are all equal, sample more prompts] -> completions packed padding-free by token budget ->
    [no-grad pass: old log-probs (num_iterations > 1, or the sampler/trainer importance weights), reference
    log-probs (beta > 0)] -> fused linear GRPO loss (`kernels.grpo`) -> backward -> optimizer step ->
    the new weights gathered from the FSDP shards a bucket at a time and copied into the generator in place.

The loss of a step is normalised over the whole step (all micro-batches, all ranks): the kernels take the
global counted-token and sequence counts, so each micro-batch's loss is its share of the global loss;
FSDP averages gradients over ranks, so each rank's loss is multiplied by the world size before backward.
bnpo is the exception, as in TRL: each micro-batch (packed row) is normalised by its own tokens and the rows'
losses are averaged (`grpo.loss.completions_per_micro_batch` fixes how many completions a row holds).

Outputs in run.output_dir/grpo/: metrics.jsonl (one line per step: rewards per component, accuracy,
completion lengths, truncation, clip fractions, KL, entropy, time and tokens/s of generation, update and
sync), checkpoints/, hf/ (the final policy), summary.json (the held-out check of the initial and the final
policy, side by side: `fastmath.heldout`, the same measurement as the SFT stage's "after").

Everything around the loop (resume, checkpoints, optimizer and schedule, metrics writers, the held-out check)
is the scaffold's, `fastmath/stage.py`.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastmath import checkpoint as ckpt
from fastmath.config import Config
from fastmath.data import DataReport, Formatter, prompt_settings, text_field, read_rows
from fastmath.colocate import GenerationUnit, even_share, join_unit, prompt_seed, unit_ranks
from fastmath.distributed import DistInfo, all_reduce_max, all_reduce_sum, wait_for_ranks
from fastmath.errors import DataError, FastmathError
from fastmath.model import export_dtype, lm_head_chunk_bytes, load_parallel_model, load_tokenizer, mixed_precision
from fastmath.policy import (PolicyWithGRPOLoss, Sequence, empty_update_batch, gathered_weights, grpo_loss_options,
                             pack_sequences)
from fastmath.answers import AnswerChecker
from fastmath.rewards import compute_rewards
from fastmath.rollout import Completion, EngineSettings, Sampling, make_generator
from fastmath.rollout_server import ServerGenerator, ServerSettings
from fastmath.stage import (OptimSettings, Stage, accumulate_micro_batches, build_optimizer, clip_gradients,
                            data_source, optim_settings, reduce_named, schedule_length, set_lr, start_model,
                            stepped_parameters)
from kernels.grpo import GRPOStats, group_advantages, reward_sums

# Config keys a resumed GRPO run must not change (they shape the data order or the update).
_RESUME_INVARIANT = ("run.seed", "grpo.init_from", "grpo.prompts", "grpo.max_steps", "grpo.prompts_per_step",
                     "grpo.rollout.num_generations", "grpo.lr", "grpo.loss.loss_type", "grpo.loss.num_iterations",
                     "grpo.schedule_steps", "grpo.loss.completions_per_micro_batch")


@dataclass
class PromptRow:
    text: str
    ids: list[int]
    answer: str
    prefill: str = ""  # the reasoning opening the templated prompt ends with; judged with each completion


@dataclass
class Group:
    """The G completions of one prompt with their rewards."""

    row: PromptRow
    completions: list[Completion]
    rewards: list[float]
    components: dict[str, list[float]]
    correct: list[bool | None]

    @property
    def zero_variance(self) -> bool:
        return max(self.rewards) - min(self.rewards) <= 0.0


# ---------------------------------------------------------------------------------------------
# Prompts


def load_prompts(config: Config, formatter: Formatter, checker: AnswerChecker, progress: bool
                 ) -> tuple[list[PromptRow], DataReport]:
    """Rows with a prompt and a usable gold answer (`fastmath.answers`' rule), prompts within max_prompt_length."""
    g = config.grpo
    source = data_source(config, g.prompts, "train")
    report = DataReport(source=source)
    candidates: list[tuple[str, object]] = []
    for row in read_rows(source, g.split, report):
        text = text_field(row, config.data.prompt_field, report)
        answer = row.get(g.answer_field)
        if text is None or formatter.skipped_for_special_tokens(report, text):
            continue
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            report.skipped[f"missing answer field '{g.answer_field}'"] += 1
            continue
        candidates.append((text, answer))
        if g.max_rows and len(candidates) >= g.max_rows:
            break
    golds = checker.gold_answers([a for _, a in candidates])
    rows = []
    for (text, _), (answer, problem) in tqdm(list(zip(candidates, golds)), desc="tokenising prompts",
                                             disable=not progress, leave=False):
        if problem is not None:
            report.skipped[problem] += 1
            continue
        ids = formatter.prompt_ids(text)
        if len(ids) > g.rollout.max_prompt_length:
            report.skipped[f"prompt longer than grpo.rollout.max_prompt_length ({g.rollout.max_prompt_length})"] += 1
            continue
        rows.append(PromptRow(text, ids, answer, formatter.reasoning_prefix))
    report.used = len(rows)
    if not rows:
        raise DataError(f"no usable GRPO prompts in {source} ({report.summary()})")
    return rows, report


def prompt_indices(n_rows: int, step: int, per_step: int, seed: int) -> list[int]:
    """The global prompts of a step: consecutive slices of per-epoch shuffles (same on every rank)."""
    out = []
    position = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, n_rows)
        order = list(range(n_rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(per_step - len(out), n_rows - offset)
        out += order[offset:offset + take]
        position += take
    return out


# ---------------------------------------------------------------------------------------------
# Rollouts and rewards


def sample_groups(generator, rows: list[PromptRow], sampling: Sampling, config: Config, checker: AnswerChecker,
                  seeds: list[int] | None = None) -> list[Group]:
    g = config.grpo
    G = g.rollout.num_generations
    completions = generator.generate([r.ids for r in rows], sampling, G, seeds)
    flat = [c for group in completions for c in group]
    texts = [r.prefill + c.text for r, group in zip(rows, completions) for c in group]  # judged: prefill + text
    golds = [r.answer for r in rows for _ in range(G)]
    verdicts = checker.check(texts, golds)
    correct = [v.correct for v in verdicts]
    tokens = [len(c.token_ids) for c in flat]
    length = tokens if g.reward.length_unit == "tokens" else [len(c.text) for c in flat]
    # Characters have no hard limit; 4 per token is the usual rule of thumb for the cosine's default scale.
    unit_limit = g.rollout.max_completion_length * (1 if g.reward.length_unit == "tokens" else 4)
    columns = {"correct": [bool(c) for c in correct], "length": length, "tokens": tokens,
               "group": [i // G for i in range(len(flat))], "truncated": [c.truncated for c in flat]}
    settings = {"max_length": g.reward.cosine_max_length or unit_limit, "limit": g.rollout.max_completion_length,
                "overlong_buffer": g.reward.overlong_buffer, "cosine_correct": tuple(g.reward.cosine_correct),
                "cosine_wrong": tuple(g.reward.cosine_wrong), "format_rule": g.reward.format_rule,
                "length_span": g.reward.length_span}
    weights = g.reward.reward_weights or [1.0] * len(g.reward.rewards)
    prompts = [r.text for r in rows for _ in range(G)]
    table = compute_rewards(g.reward.rewards, weights, prompts, texts, golds, columns, settings)
    for name, error in table.failures.items():
        print(f"fastmath: warning: reward '{name}' failed and scored 0 for this batch: {error}", flush=True)
    groups = []
    for i, row in enumerate(rows):
        span = slice(i * G, (i + 1) * G)
        groups.append(Group(row, completions[i], table.total[span],
                            {k: v[span] for k, v in table.components.items()}, correct[span]))
    return groups


def rollout_step(generator, rows: list[PromptRow], step: int, config: Config, checker: AnswerChecker,
                 dist_info: DistInfo, unit: GenerationUnit | None = None) -> tuple[list[Group], dict]:
    """This rank's groups for one step, with dynamic sampling when enabled; returns (groups, counts).

    The step's prompts are split as evenly as they go over the generation units (one engine each: a rank, or a
    tensor-parallel group of ranks, `fastmath.colocate`); every rank of a unit generates the unit's prompts with
    the same seeds, then keeps its own even share of the groups for the update. Seeds are per prompt, from its
    position in the step, so a prompt's completions do not depend on the split."""
    g = config.grpo
    G, seed = g.rollout.num_generations, config.run.seed
    unit = unit or GenerationUnit(dist_info.rank, dist_info.world_size, 0, 1)
    share = even_share(g.prompts_per_step, unit.index, unit.count)
    mine = prompt_indices(len(rows), step, g.prompts_per_step, seed)[share]
    sampling = Sampling(temperature=g.rollout.temperature, top_p=g.rollout.top_p, min_p=g.rollout.min_p,
                        top_k=g.rollout.top_k,
                        max_tokens=g.rollout.max_completion_length, stop=list(g.rollout.stop),
                        seed=seed * 100_003 + step * 97 + unit.index)
    seeds = [prompt_seed(seed, step, i, G) for i in range(share.start, share.stop)]
    groups = sample_groups(generator, [rows[i] for i in mine], sampling, config, checker, seeds)
    target = len(mine)
    if not g.rollout.dynamic_sampling:
        groups = groups[even_share(len(groups), unit.rank_in_unit, unit.size)]
        return groups, {"groups_sampled": len(groups), "groups_dropped": 0, "resample_rounds": 0}
    kept = [grp for grp in groups if not grp.zero_variance]
    all_sampled = list(groups)
    rng = random.Random(seed * 7_919 + step * 31 + unit.index)  # the same extra prompts on a unit's ranks
    rounds = 0
    for round_ in range(1, g.rollout.max_resample_rounds + 1):
        if not _unit_wants_more(len(kept) < target, unit, dist_info.device):
            break
        extra = [rows[i] for i in rng.sample(range(len(rows)), min(len(rows), max(0, target - len(kept))))]
        sampling.seed += 1
        # Positions past the step's prompts, disjoint across units and rounds (a unit asks for <= its share).
        first = g.prompts_per_step * round_ + share.start
        more = sample_groups(generator, extra, sampling, config, checker,
                             [prompt_seed(seed, step, first + j, G) for j in range(len(extra))])
        all_sampled += more
        kept += [grp for grp in more if not grp.zero_variance]
        rounds = round_
    kept = kept[:target]
    # Metrics describe everything sampled this step, once per unit; the update sees the informative groups only.
    reports = unit.reports
    counts = {"groups_sampled": len(all_sampled) if reports else 0,
              "groups_dropped": len(all_sampled) - len(kept) if reports else 0,
              "resample_rounds": rounds if reports else 0, "all_sampled": all_sampled if reports else []}
    return kept[even_share(len(kept), unit.rank_in_unit, unit.size)], counts


def _unit_wants_more(wants: bool, unit: GenerationUnit, device: torch.device) -> bool:
    """Whether any rank of the unit wants another resampling round (they generate together, so all go on or all
    stop: a reward check that timed out on one rank only must not split them). One small collective and host
    sync per round, tensor-parallel units only."""
    if unit.size == 1:
        return wants
    flag = torch.tensor([int(wants)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=unit.group)
    return bool(flag.item())


def advantages_for(groups: list[Group], config: Config, dist_info: DistInfo) -> list[list[float]]:
    """Per-completion advantages, computed on the training device (the Triton kernel on GPUs); 'batch' scaling
    divides by the std of every reward of the step: each rank's reward sums, all-reduced once on the device."""
    g = config.grpo
    G = g.rollout.num_generations
    rewards = torch.tensor([r for grp in groups for r in grp.rewards], dtype=torch.float32, device=dist_info.device)
    batch_sums = None
    if g.loss.scale_rewards == "batch":
        batch_sums = reward_sums(rewards)  # zeros on a rank without groups, which stays in step with the others
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(batch_sums)
    if not groups:
        return []
    adv = group_advantages(rewards, G, scale=g.loss.scale_rewards, batch_sums=batch_sums).advantages
    adv = adv.tolist()  # a host sync, once per step: the sequences carry their advantage as a float
    return [adv[i * G:(i + 1) * G] for i in range(len(groups))]


# ---------------------------------------------------------------------------------------------
# The update


def build_update_batches(seqs: list[Sequence], budget: int, pad_id: int, device: torch.device, per_row: int = 0):
    """Packed rows of this rank's sequences (per_row > 0: that many sequences per row), padded with empty rows to
    the busiest rank's count (FSDP runs collectives per forward, so every rank must run as many); returns
    (batches on device, this rank's real rows, the step's global counts)."""
    batches = pack_sequences(seqs, budget, per_row) if seqs else []
    n_real = len(batches)
    # Two small collectives (each a host sync), once per step: the rank's row count and the step's global
    # counts are needed on the host, to run as many micro-batches and to normalise the loss.
    n_micro = all_reduce_max(n_real, device)
    batches += [empty_update_batch(pad_id) for _ in range(n_micro - n_real)]
    local_tokens = sum(int(b.mask.sum()) for b in batches[:n_real])  # host tensors, still on the CPU: no sync
    local_seqs = sum(b.num_sequences for b in batches[:n_real])
    tokens, sequences, rows = all_reduce_sum([local_tokens, local_seqs, n_real], device)
    return [b.to(device) for b in batches], n_real, StepCounts(tokens, sequences, rows)


@torch.no_grad()
def attach_logprobs(model, ref_model, batches, g, autocast) -> list[torch.Tensor | None]:
    """Old log-probs (needed for num_iterations > 1 and for the sampler importance weights) and reference
    log-probs (beta > 0) in no-grad passes; returns each row's truncated importance weights
    min(exp(old - sampler), cap) (TRL's token_truncate), or None where not used."""
    need_old = g.loss.num_iterations > 1 or g.loss.vllm_is_correction
    if need_old or ref_model is not None:
        with autocast():
            for b in batches:
                if need_old:
                    b.old_logprobs = model(b, mode="logprobs")[0].float()
                if ref_model is not None:
                    b.ref_logprobs = ref_model(b, mode="logprobs")[0].float()
                    release_gathered(ref_model)
    weights = []
    for b in batches:
        if g.loss.vllm_is_correction and b.sampler_logprobs is not None and b.old_logprobs is not None:
            weights.append(torch.exp(b.old_logprobs - b.sampler_logprobs).clamp(max=g.loss.vllm_is_cap))
        else:
            weights.append(None)
    return weights


def release_gathered(model) -> None:
    """Free a no-grad forward's all-gathered parameters. FSDP2 keeps the root's gathered parameters (embeddings,
    final norm, LM head: 2 * V * d bf16 bytes, 3 GiB at 14B) after its forward, expecting a backward to use them;
    a frozen reference model never runs one, so they would stay gathered for the whole run."""
    if hasattr(model, "reshard"):
        model.reshard()


@dataclass(frozen=True)
class StepCounts:
    """A step's update, counted over every rank (`build_update_batches`): what normalises each micro-batch's loss."""

    tokens: float     # counted completion tokens
    sequences: float  # completions
    rows: float       # real (non-padding) packed rows: bnpo's divisor


@dataclass(frozen=True)
class UpdateSettings:
    """How the policy update runs, the same every step (`update_settings` builds it from the config)."""

    optim: OptimSettings
    num_iterations: int   # optimizer steps per batch of rollouts (grpo.loss.num_iterations)
    loss_type: str        # grpo.loss.loss_type: bnpo weights each row 1 / rows, the others are normalised globally
    schedule_steps: int   # the learning-rate schedule's length in GRPO steps (stage.schedule_length)
    world_size: int       # FSDP averages gradients over ranks: each share is multiplied by it before backward
    gradient_sync: str    # parallel.gradient_sync: when FSDP reduces gradients (stage.micro_batches)
    autocast: Callable


def update_settings(config: Config, optim: OptimSettings, schedule_steps: int, world_size: int,
                    autocast: Callable) -> UpdateSettings:
    loss = config.grpo.loss
    return UpdateSettings(optim, loss.num_iterations, loss.loss_type, schedule_steps, world_size,
                          config.parallel.gradient_sync, autocast)


@dataclass
class UpdateResult:
    loss: float          # the step's global loss (of the last of the num_iterations updates)
    grad_norm: torch.Tensor  # a device scalar, read with the step's metrics
    lr: float
    stats: GRPOStats     # float64 sums over this rank's rows, of the first of the num_iterations updates
    skipped: bool        # the loss was non-finite: no optimizer step was taken


def update_policy(model, optimizer, batches, weights, counts: StepCounts, settings: UpdateSettings,
                  step: int) -> UpdateResult:
    """num_iterations optimizer steps on this rank's packed rows (every rank calls this with as many rows).

    Each micro-batch's loss is its share of the global loss (global token / sequence counts); for bnpo it is the
    row's own token mean, weighted 1 / counts.rows (the step's real rows), so the step's loss is the mean of
    the rows' token means, TRL's bnpo averaged over accumulation steps and ranks. FSDP averages gradients over
    ranks, so each share is multiplied by the world size before backward. The learning rate follows a schedule
    of settings.schedule_steps steps. A non-finite global loss skips the optimizer step (gradients dropped) and
    reports it; the caller counts and aborts.
    """
    nan = torch.tensor(float("nan"))
    if not batches:  # dynamic sampling dropped every group of the step on every rank: nothing to learn from
        zeros = torch.zeros(len(GRPOStats._fields), dtype=torch.float64)
        return UpdateResult(0.0, torch.tensor(0.0), 0.0, GRPOStats.from_stacked(zeros), skipped=False)
    device = batches[0].seq_ids.device
    params = stepped_parameters(optimizer)  # not model.parameters(): attach_logprobs left FSDP's root gathered
    iterations = settings.num_iterations
    total_updates = settings.schedule_steps * iterations
    share = 1.0 / max(1.0, counts.rows) if settings.loss_type == "bnpo" else 1.0
    stats_total = torch.zeros(len(GRPOStats._fields), dtype=torch.float64, device=device)
    loss_value, grad_norm, lr = float("nan"), nan, 0.0
    pass_stats: list[GRPOStats] = []  # of the current pass over the rows

    def forward(micro, batch):
        loss, stats = model(batch, num_items_in_batch=max(1.0, counts.tokens),
                            num_sequences=max(1.0, counts.sequences), importance_weights=weights[micro])
        pass_stats.append(stats)
        return loss

    for it in range(iterations):
        lr = set_lr(optimizer, settings.optim, step * iterations + it, total_updates)
        pass_stats.clear()
        loss_sum = accumulate_micro_batches(model, batches, forward, share * settings.world_size, device,
                                            settings.autocast, settings.gradient_sync, loss_weight=share)
        if it == 0:
            for stats in pass_stats:
                stats_total += stats.stacked().double()
        # Host sync + collective, once per update: whether to step depends on the global loss being finite.
        (loss_value,) = all_reduce_sum([loss_sum.item()], device)
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            return UpdateResult(loss_value, nan, lr, GRPOStats.from_stacked(stats_total), skipped=True)
        grad_norm = clip_gradients(params, settings.optim)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return UpdateResult(loss_value, grad_norm, lr, GRPOStats.from_stacked(stats_total), skipped=False)


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; aborts the run after `limit` in a row."""

    def __init__(self, limit: int, verbose: bool = True):
        self.limit, self.verbose, self.in_a_row = limit, verbose, 0

    def ok(self) -> None:
        self.in_a_row = 0

    def failed(self, step: int) -> None:
        self.in_a_row += 1
        if self.verbose:
            print(f"fastmath: warning: non-finite GRPO loss at step {step}; update skipped "
                  f"({self.in_a_row} in a row, abort at {self.limit})", flush=True)
        if self.in_a_row >= self.limit:
            raise FastmathError(f"GRPO loss was non-finite in {self.in_a_row} consecutive steps (last: step "
                                f"{step}); lower grpo.lr or check the rewards and data")


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class Policy:
    """The trained policy and what updates it."""

    causal_lm: torch.nn.Module      # the HF model (FSDP-sharded in place): exported and synced to the generator
    model: torch.nn.Module          # the GRPO-loss wrapper around it
    ref_model: torch.nn.Module | None  # the frozen initial policy, when beta > 0
    optimizer: torch.optim.Optimizer
    optim: OptimSettings
    autocast: Callable
    bf16: bool = False               # the run computes in bf16 (the export's dtype follows it by default)


def build_policy(config: Config, init_path: str, dist_info: DistInfo) -> Policy:
    """Policy (FSDP), optional frozen reference, AdamW."""
    g, m = config.grpo, config.model
    bf16, autocast = mixed_precision(m.precision, dist_info.device)
    loss_options = grpo_loss_options(g)
    chunk_bytes = lm_head_chunk_bytes(m)

    def wrap(lm):
        return PolicyWithGRPOLoss(lm, g.rollout.temperature, loss_options, chunk_bytes)

    causal_lm, model = load_parallel_model(init_path, wrap, m, dist_info, bf16, config.parallel.replicate)
    model.train()
    ref_model = None
    if g.loss.beta > 0:  # frozen, in the compute dtype, sharded like the policy and resharded after each forward
        _, ref_model = load_parallel_model(init_path, wrap, m, dist_info, bf16, config.parallel.replicate,
                                           trainable=False)
        ref_model.eval()
    optim = optim_settings(config, "grpo")
    return Policy(causal_lm, model, ref_model, build_optimizer(model, optim), optim, autocast, bf16)


class WeightSync:
    """Copies the policy's weights into the generator in place, a bucket of gathered parameters at a time."""

    def __init__(self, generator, causal_lm: torch.nn.Module, bucket_mib: int, device: torch.device):
        self.generator, self.causal_lm = generator, causal_lm
        self.bucket_bytes = bucket_mib * 2**20
        self.dtype = torch.bfloat16 if device.type == "cuda" else None
        self.bytes = 0  # of the last sync

    def _counted(self, weights):
        for name, tensor in weights:
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    def __call__(self) -> float:
        """Sync; returns the seconds it took."""
        started = time.perf_counter()
        self.bytes = 0
        with torch.no_grad():
            self.generator.load_weights(self._counted(gathered_weights(self.causal_lm, self.bucket_bytes,
                                                                       self.dtype)))
        return time.perf_counter() - started


def _sequences(groups: list[Group], advantages: list[list[float]], mask_truncated: bool) -> list[Sequence]:
    seqs = []
    for grp, advs in zip(groups, advantages):
        for c, adv in zip(grp.completions, advs):
            if not c.token_ids:  # nothing to learn from; counted in the metrics as an empty completion
                continue
            counted = not (mask_truncated and c.truncated)
            seqs.append(Sequence(grp.row.ids, list(c.token_ids), c.logprobs, float(adv), counted))
    return seqs


def run_grpo(config: Config, dist_info: DistInfo) -> dict:
    g = config.grpo
    unit_ranks(dist_info.world_size, g.rollout.vllm_tensor_parallel_size,
               "grpo.rollout.vllm_tensor_parallel_size")  # refuse now
    stage = Stage("grpo", config, dist_info, Path(config.run.output_dir) / "grpo", _RESUME_INVARIANT,
                  heldout=g.prompts == "embedded")
    ckpt.seed_all(config.run.seed)

    # 1. Policy path, tokenizer, prompts -------------------------------------------------------------------
    init_path = start_model(config, "grpo")
    tokenizer = load_tokenizer(init_path, config.model.trust_remote_code)
    formatter = Formatter(tokenizer, config.data.prompt_field, **prompt_settings(config, "grpo"))
    checker = AnswerChecker(g.reward.reward_workers, g.reward.reward_timeout_s, g.reward.answer_check)
    cleanup = [checker.close]  # also on errors: the worker pool and the generator must not outlive the stage
    try:
        rows, report = load_prompts(config, formatter, checker, progress=dist_info.is_main)
        if dist_info.is_main:
            print(report.summary(), flush=True)
        return _train(stage, config, dist_info, init_path, tokenizer, checker, rows, cleanup)
    finally:
        for close in reversed(cleanup):
            close()


def grpo_engine_settings(config: Config) -> EngineSettings:
    g = config.grpo
    return EngineSettings(kind=g.rollout.generator,
                          max_model_len=g.rollout.max_prompt_length + g.rollout.max_completion_length,
                          seed=config.run.seed, gpu_memory_utilization=g.rollout.vllm_gpu_memory_utilization,
                          cpu_kv_cache_gib=g.rollout.vllm_cpu_kv_cache_gib,
                          tensor_parallel_size=g.rollout.vllm_tensor_parallel_size,
                          sleep_mode=g.rollout.vllm_sleep, enforce_eager=g.rollout.vllm_enforce_eager,
                          max_num_batched_tokens=g.rollout.vllm_max_num_batched_tokens,
                          trust_remote_code=config.model.trust_remote_code)


def _train(stage: Stage, config: Config, dist_info: DistInfo, init_path: str, tokenizer, checker: AnswerChecker,
           rows: list[PromptRow], cleanup: list) -> dict:
    g = config.grpo
    # 2. Policy, optimizer, resume point, the held-out check of the initial policy ----------------------------
    policy = build_policy(config, init_path, dist_info)
    resume = stage.resume(policy.model, policy.optimizer)
    tracker = stage.open_outputs(resume.step)
    before = stage.before(resume, lambda: {"heldout": stage.heldout(init_path)})

    # 3. Generator (starts from the initial weights; a resumed run pushes the checkpoint's in) ---------------
    unit = join_unit(dist_info.rank, dist_info.world_size, g.rollout.vllm_tensor_parallel_size,
                     "grpo.rollout.vllm_tensor_parallel_size")
    if g.rollout.vllm_mode == "server":
        generator = ServerGenerator(ServerSettings.from_config(g, init_path), tokenizer, dist_info.rank,
                                    dist_info.device)
    else:
        generator = make_generator(grpo_engine_settings(config), init_path, tokenizer, dist_info, unit,
                                   verbose=dist_info.is_main)
    cleanup.append(generator.close)
    sync = WeightSync(generator, policy.causal_lm, g.rollout.sync_bucket_mib, dist_info.device)
    if resume.step or g.rollout.vllm_mode == "server":  # a server may hold any weights (a restart, a later step)
        sync()
    if dist_info.is_main:
        print(f"GRPO from {init_path}: {g.max_steps} steps x {g.prompts_per_step} prompts x "
              f"{g.rollout.num_generations} "
              f"completions on {dist_info.world_size} process(es); generator: {type(generator).__name__}",
              flush=True)

    # 4. The loop; then the final checkpoint, the export and the held-out check of the final policy ----------
    tokens_seen, skipped_steps = train(stage, config, dist_info, policy, generator, sync, tokenizer, checker,
                                       rows, resume.step, resume.tokens_seen, unit)
    if resume.step < g.max_steps:
        stage.save(g.max_steps, tokens_seen, policy.model, policy.optimizer)
    export_dir = ckpt.export_hf(policy.causal_lm, tokenizer, stage.out_dir / "hf", dist_info,
                                export_dtype(config.model, policy.bf16))
    after = {"heldout": stage.heldout(str(export_dir))}
    return stage.finish({"stage": "grpo", "steps": g.max_steps, "tokens_seen": tokens_seen, "start": init_path,
                         "export": str(export_dir), "skipped_steps": skipped_steps, "before": before,
                         "after": after})


def train(stage: Stage, config: Config, dist_info: DistInfo, policy: Policy, generator, sync: WeightSync,
          tokenizer, checker: AnswerChecker, rows: list[PromptRow], start_step: int,
          tokens_seen: int, unit: GenerationUnit | None = None) -> tuple[int, int]:
    """The loop: rollouts, advantages, packed update, weight sync, metrics, checkpoint; returns
    (tokens seen, skipped steps). tokens seen counts the packed update rows' tokens (prompt + completion)."""
    g = config.grpo
    main, device, world = dist_info.is_main, dist_info.device, dist_info.world_size
    bar = tqdm(total=g.max_steps, initial=start_step, desc="grpo", disable=not main, dynamic_ncols=True)
    guard, skipped_steps = NonFiniteGuard(g.max_bad_steps, main), 0
    horizon = schedule_length(g, g.max_steps, prompt_rows=len(rows))  # the seed's runs past the stop
    settings = update_settings(config, policy.optim, horizon, world, policy.autocast)
    for step in range(start_step, g.max_steps):
        t0 = time.perf_counter()
        groups, counts = rollout_step(generator, rows, step, config, checker, dist_info, unit)
        t_gen = time.perf_counter() - t0
        sampled = counts.pop("all_sampled", groups)
        generator.sleep()
        # Rollouts take as long as their longest completion: meet here, so a stalled rank is named.
        wait_for_ranks(f"the end of step {step + 1}'s rollout")

        # Advantages, sequences, packed rows; every rank runs as many micro-batches as the busiest one.
        t1 = time.perf_counter()
        advantages = advantages_for(groups, config, dist_info)
        seqs = _sequences(groups, advantages, g.loss.mask_truncated)
        batches, n_real, step_counts = build_update_batches(
            seqs, g.tokens_per_micro_batch, tokenizer.pad_token_id, device, g.loss.completions_per_micro_batch)
        weights = attach_logprobs(policy.model, policy.ref_model, batches, g, policy.autocast)
        result = update_policy(policy.model, policy.optimizer, batches, weights, step_counts, settings, step)
        if result.skipped:
            skipped_steps += 1
            guard.failed(step + 1)
        else:
            guard.ok()
        t_update = time.perf_counter() - t1
        t_sync = sync()

        # Metrics: one reduction (and host sync) for the step's sums, one for the longest completion.
        local_tokens = sum(b.packed.num_tokens for b in batches[:n_real])
        record = {"step": step + 1}
        record.update(_step_metrics(sampled, counts, result, local_tokens, config, dist_info))
        tokens_seen += int(record.pop("update_tokens"))
        record.update({"loss": result.loss, "lr": result.lr, "skipped_steps": skipped_steps,
                       "tokens_seen": tokens_seen, "time/generate_s": t_gen, "time/update_s": t_update,
                       "time/sync_s": t_sync, "generate_tokens_per_s": record["completion_tokens"] / max(t_gen, 1e-9),
                       "sync_bytes": sync.bytes, "sync_gb_per_s": sync.bytes / 1e9 / max(t_sync, 1e-9),
                       "answer_timeouts": checker.counts["timeout"], "checker_restarts": checker.restarts})
        record["update_tokens_per_s"] = record["tokens"] * g.loss.num_iterations / max(t_update, 1e-9)

        # Metrics line, then the checkpoint that makes this step done.
        done = step + 1
        if done % g.log_every == 0 or done == g.max_steps:
            stage.tracker.write(record)
        if stage.save_due(done, g.max_steps):
            stage.save(done, tokens_seen, policy.model, policy.optimizer)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", acc=f"{record['accuracy']:.2f}",
                        len=f"{record['completion_tokens_mean']:.0f}", kl=f"{record['kl']:.4f}",
                        gen_s=f"{t_gen:.1f}", upd_s=f"{t_update:.1f}", refresh=False)
    bar.close()
    return tokens_seen, skipped_steps


def _step_metrics(sampled: list[Group], counts: dict, result: UpdateResult, update_tokens: int, config: Config,
                  dist_info: DistInfo) -> dict:
    """Everything a person watching an RL run needs, summed over ranks once; `update_tokens` (this rank's packed
    update tokens) comes back summed as "update_tokens" and as "tokens"."""
    names = config.grpo.reward.rewards
    device = dist_info.device
    flat = [(grp, i) for grp in sampled for i in range(len(grp.completions))]
    lengths = [len(grp.completions[i].token_ids) for grp, i in flat]
    rewards = [grp.rewards[i] for grp, i in flat]
    sums = {f"loss/{field}": value.to(device) for field, value in result.stats._asdict().items()}
    sums.update({
        "completions": len(flat), "reward": sum(rewards), "reward^2": sum(r * r for r in rewards),
        "correct": sum(1 for grp, i in flat if grp.correct[i]), "completion_tokens": sum(lengths),
        "truncated": sum(1 for grp, i in flat if grp.completions[i].truncated),
        "empty": sum(1 for grp, i in flat if not grp.completions[i].token_ids or not grp.completions[i].text.strip()),
        "groups_sampled": counts["groups_sampled"], "groups_dropped": counts["groups_dropped"],
        "resample_rounds": counts["resample_rounds"], "zero_variance_groups": sum(1 for grp in sampled
                                                                                  if grp.zero_variance),
        "update_tokens": update_tokens})
    for name in names:
        values = [grp.components[name][i] for grp, i in flat]
        sums[f"reward/{name}"], sums[f"reward/{name}^2"] = sum(values), sum(v * v for v in values)
    # The step's host sync: these sums and the GRPO statistics in one collective, read with the grad norm.
    total = reduce_named(sums, {"grad_norm": result.grad_norm.to(device)}, device)
    max_len = all_reduce_max(max(lengths, default=0), device)  # a second small collective and sync
    n = max(1.0, total["completions"])

    def std(key):  # of the values summed as `key` (their squares as key^2)
        return math.sqrt(max(0.0, total[f"{key}^2"] / n - (total[key] / n) ** 2))

    out = {"reward/mean": total["reward"] / n, "reward/std": std("reward"), "accuracy": total["correct"] / n,
           "completion_tokens_mean": total["completion_tokens"] / n, "completion_tokens_max": max_len,
           "completion_tokens": total["completion_tokens"], "truncated_rate": total["truncated"] / n,
           "empty_completions": int(total["empty"]), "groups_sampled": int(total["groups_sampled"]),
           "groups_dropped": int(total["groups_dropped"]), "resample_rounds_max": int(total["resample_rounds"]),
           "zero_variance_groups": int(total["zero_variance_groups"])}
    for name in names:
        out[f"reward/{name}/mean"] = total[f"reward/{name}"] / n
        out[f"reward/{name}/std"] = std(f"reward/{name}")
    out["update_tokens"] = out["tokens"] = int(total["update_tokens"])
    out["grad_norm"] = total["grad_norm"]
    tokens = max(1.0, total["loss/tokens"])
    low, high = total["loss/low_clipped"], total["loss/high_clipped"]
    out.update({"clip_low_fraction": low / tokens, "clip_high_fraction": high / tokens,
                "clip_region_fraction": (low + high) / tokens, "kl": total["loss/kl_sum"] / tokens,
                "ratio_mean": total["loss/ratio_sum"] / tokens, "entropy": total["loss/entropy_sum"] / tokens})
    return out
