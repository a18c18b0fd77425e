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

Outputs in run.output_dir/grpo/: metrics.jsonl (one line per step: rewards per component, accuracy,
completion lengths, truncation, clip fractions, KL, entropy, time and tokens/s of generation, update and
sync), checkpoints/, hf/ (the final policy), summary.json (held-out accuracy and mean tokens of the initial
and final policy, side by side).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastmath import checkpoint as ckpt
from fastmath.config import Config, to_dict
from fastmath.data import DataReport, Formatter, text_field, read_rows
from fastmath.distributed import DistInfo, all_reduce_max, all_reduce_sum
from fastmath.errors import CheckpointError, ConfigError, DataError, FastmathError
from fastmath.model import load_causal_lm, load_tokenizer, mixed_precision, parallelize, resolve_model_path
from fastmath.policy import PolicyWithGRPOLoss, Sequence, empty_update_batch, gathered_weights, pack_sequences
from fastmath.rewards import AnswerChecker, compute_rewards
from fastmath.rollout import Completion, Sampling, make_generator
from fastmath.sft import build_optimizer, lr_at
from fastmath.synthetic import answers_match, extract_boxed
from kernels.grpo import group_advantages

# Config keys a resumed GRPO run must not change (they shape the data order or the update).
_RESUME_INVARIANT = ("run.seed", "grpo.init_from", "grpo.prompts", "grpo.max_steps", "grpo.prompts_per_step",
                     "grpo.num_generations", "grpo.lr", "grpo.loss_type", "grpo.num_iterations")


@dataclass
class PromptRow:
    text: str
    ids: list[int]
    answer: str


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
    """Rows with a prompt and a gold answer that math-verify parses, prompts within max_prompt_length."""
    g = config.grpo
    source = g.prompts
    if source == "embedded":
        from fastmath.embedded import ensure_embedded_assets

        source = str(ensure_embedded_assets(config.run.cache_dir or None).data_dir / "train.jsonl")
    report = DataReport(source=source)
    candidates: list[tuple[str, str]] = []
    for row in read_rows(source, g.split, report):
        text = text_field(row, config.data.prompt_field, report)
        answer = row.get(g.answer_field)
        if text is None:
            continue
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            report.skipped[f"missing answer field '{g.answer_field}'"] += 1
            continue
        candidates.append((text, str(answer)))
        if g.max_rows and len(candidates) >= g.max_rows:
            break
    parses = checker.gold_parses([a for _, a in candidates])
    rows = []
    for (text, answer), ok in tqdm(list(zip(candidates, parses)), desc="tokenising prompts", disable=not progress,
                                   leave=False):
        if not ok:
            report.skipped["gold answer math-verify cannot parse"] += 1
            continue
        ids = formatter.prompt_ids(text)
        if len(ids) > g.max_prompt_length:
            report.skipped[f"prompt longer than grpo.max_prompt_length ({g.max_prompt_length})"] += 1
            continue
        rows.append(PromptRow(text, ids, answer))
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


def sample_groups(generator, rows: list[PromptRow], sampling: Sampling, config: Config, tokenizer,
                  checker: AnswerChecker) -> list[Group]:
    g = config.grpo
    G = g.num_generations
    completions = generator.generate([r.ids for r in rows], sampling, G)
    flat = [c for group in completions for c in group]
    texts = [c.text for c in flat]
    golds = [r.answer for r in rows for _ in range(G)]
    verdicts = checker.check(texts, golds)
    correct = [v.correct for v in verdicts]
    tokens = [len(c.token_ids) for c in flat]
    length = tokens if g.length_unit == "tokens" else [len(c.text) for c in flat]
    # Characters have no hard limit; 4 per token is the usual rule of thumb for the cosine's default scale.
    unit_limit = g.max_completion_length * (1 if g.length_unit == "tokens" else 4)
    columns = {"correct": [bool(c) for c in correct], "length": length, "tokens": tokens,
               "group": [i // G for i in range(len(flat))], "truncated": [c.truncated for c in flat]}
    settings = {"max_length": g.cosine_max_length or unit_limit, "limit": g.max_completion_length,
                "overlong_buffer": g.overlong_buffer, "cosine_correct": tuple(g.cosine_correct),
                "cosine_wrong": tuple(g.cosine_wrong)}
    weights = g.reward_weights or [1.0] * len(g.rewards)
    prompts = [r.text for r in rows for _ in range(G)]
    table = compute_rewards(g.rewards, weights, prompts, texts, golds, columns, settings)
    for name, error in table.failures.items():
        print(f"fastmath: warning: reward '{name}' failed and scored 0 for this batch: {error}", flush=True)
    groups = []
    for i, row in enumerate(rows):
        span = slice(i * G, (i + 1) * G)
        groups.append(Group(row, completions[i], table.total[span],
                            {k: v[span] for k, v in table.components.items()}, correct[span]))
    return groups


def rollout_step(generator, rows: list[PromptRow], step: int, config: Config, tokenizer, checker: AnswerChecker,
                 dist_info: DistInfo) -> tuple[list[Group], dict]:
    """This rank's groups for one step, with dynamic sampling when enabled; returns (groups, counts)."""
    g = config.grpo
    per_rank = g.prompts_per_step // dist_info.world_size
    mine = prompt_indices(len(rows), step, g.prompts_per_step, config.run.seed)
    mine = mine[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
    sampling = Sampling(temperature=g.temperature, top_p=g.top_p, min_p=g.min_p, max_tokens=g.max_completion_length,
                        stop=list(g.stop), seed=config.run.seed * 100_003 + step * 97 + dist_info.rank)
    groups = sample_groups(generator, [rows[i] for i in mine], sampling, config, tokenizer, checker)
    counts = {"groups_sampled": len(groups), "groups_dropped": 0, "resample_rounds": 0}
    if not g.dynamic_sampling:
        return groups, counts
    kept = [grp for grp in groups if not grp.zero_variance]
    all_sampled = list(groups)
    rng = random.Random(config.run.seed * 7_919 + step * 31 + dist_info.rank)
    for round_ in range(1, g.max_resample_rounds + 1):
        if len(kept) >= per_rank:
            break
        extra = [rows[i] for i in rng.sample(range(len(rows)), min(len(rows), per_rank - len(kept)))]
        sampling.seed += 1
        more = sample_groups(generator, extra, sampling, config, tokenizer, checker)
        all_sampled += more
        kept += [grp for grp in more if not grp.zero_variance]
        counts["resample_rounds"] = round_
    counts["groups_sampled"] = len(all_sampled)
    counts["groups_dropped"] = len(all_sampled) - len(kept)
    # Metrics describe everything sampled this step; the update sees the informative groups only.
    counts["all_sampled"] = all_sampled
    return kept[:per_rank], counts


def advantages_for(groups: list[Group], config: Config, dist_info: DistInfo) -> list[list[float]]:
    """Per-completion advantages; 'batch' scaling divides by the std of every reward of the step (all ranks)."""
    g = config.grpo
    if not groups:
        if g.scale_rewards == "batch":
            all_reduce_sum([0.0, 0.0, 0.0], dist_info.device)  # stay in step with the other ranks
        return []
    G = g.num_generations
    rewards = torch.tensor([r for grp in groups for r in grp.rewards], dtype=torch.float32)
    if g.scale_rewards == "batch":
        centred = group_advantages(rewards, G, scale="none").advantages
        n, s, ss = all_reduce_sum([rewards.numel(), float(rewards.sum()), float((rewards.double() ** 2).sum())],
                                  dist_info.device)
        var = max(0.0, (ss - s * s / n) / max(1.0, n - 1))
        adv = centred / (math.sqrt(var) + 1e-4)
    else:
        adv = group_advantages(rewards, G, scale=g.scale_rewards).advantages
    adv = adv.tolist()
    return [adv[i * G:(i + 1) * G] for i in range(len(groups))]


# ---------------------------------------------------------------------------------------------
# The update


def build_update_batches(seqs: list[Sequence], budget: int, pad_id: int, device: torch.device):
    """Packed rows of this rank's sequences, padded with empty rows to the busiest rank's count (FSDP runs
    collectives per forward, so every rank must run as many); returns (batches on device, real rows,
    global counted tokens, global sequences)."""
    batches = pack_sequences(seqs, budget) if seqs else []
    n_real = len(batches)
    n_micro = all_reduce_max(n_real, device)
    batches += [empty_update_batch(pad_id) for _ in range(n_micro - n_real)]
    local_tokens = sum(int(b.mask.sum()) for b in batches[:n_real])
    local_seqs = sum(b.num_sequences for b in batches[:n_real])
    global_tokens, global_seqs = all_reduce_sum([local_tokens, local_seqs], device)
    return [b.to(device) for b in batches], n_real, global_tokens, global_seqs


@torch.no_grad()
def attach_logprobs(model, ref_model, batches, g, autocast) -> list[torch.Tensor | None]:
    """Old log-probs (needed for num_iterations > 1 and for the sampler importance weights) and reference
    log-probs (beta > 0) in no-grad passes; returns each row's truncated importance weights
    min(exp(old - sampler), cap) (TRL's token_truncate), or None where not used."""
    need_old = g.num_iterations > 1 or g.vllm_is_correction
    if need_old or ref_model is not None:
        with autocast():
            for b in batches:
                if need_old:
                    b.old_logprobs = model(b, mode="logprobs")[0].float()
                if ref_model is not None:
                    b.ref_logprobs = ref_model(b, mode="logprobs")[0].float()
    weights = []
    for b in batches:
        if g.vllm_is_correction and b.sampler_logprobs is not None and b.old_logprobs is not None:
            weights.append(torch.exp(b.old_logprobs - b.sampler_logprobs).clamp(max=g.vllm_is_cap))
        else:
            weights.append(None)
    return weights


@dataclass
class UpdateResult:
    loss: float          # the step's global loss (of the last of the num_iterations updates)
    grad_norm: float
    lr: float
    stats: torch.Tensor  # GRPOStats sums of the first update, stacked [6], this rank only
    skipped: bool        # the loss was non-finite: no optimizer step was taken


def update_policy(model, optimizer, batches, weights, global_tokens: float, global_seqs: float, g, step: int,
                  world: int, autocast) -> UpdateResult:
    """num_iterations optimizer steps on this rank's packed rows (every rank calls this with as many rows).

    Each micro-batch's loss is its share of the global loss (global token / sequence counts); FSDP averages
    gradients over ranks, so it is multiplied by `world` before backward. A non-finite global loss skips
    the optimizer step (gradients dropped) and reports it; the caller counts and aborts.
    """
    if not batches:  # dynamic sampling dropped every group of the step on every rank: nothing to learn from
        return UpdateResult(0.0, 0.0, 0.0, torch.zeros(6, dtype=torch.float64), skipped=False)
    device = batches[0].seq_ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    fsdp = hasattr(model, "set_requires_gradient_sync")
    total_updates = g.max_steps * g.num_iterations
    stats_total = torch.zeros(6, dtype=torch.float64, device=device)
    loss_value, grad_norm, lr = float("nan"), float("nan"), 0.0
    for it in range(g.num_iterations):
        lr = lr_at(step * g.num_iterations + it, total_updates, g.lr, g.warmup_ratio, g.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro, batch in enumerate(batches):
            if fsdp:
                model.set_requires_gradient_sync(micro == len(batches) - 1)
            with autocast():
                loss, stats = model(batch, num_items_in_batch=max(1.0, global_tokens),
                                    num_sequences=max(1.0, global_seqs), importance_weights=weights[micro])
            (loss * world).backward()
            loss_sum += loss.detach().double()
            if it == 0:
                stats_total += stats.stacked().double()
        (loss_value,) = all_reduce_sum([loss_sum.item()], device)
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            return UpdateResult(loss_value, float("nan"), lr, stats_total, skipped=True)
        norm = torch.nn.utils.clip_grad_norm_(params, g.grad_clip or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return UpdateResult(loss_value, grad_norm, lr, stats_total, skipped=False)


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
# Held-out accuracy with the generator (greedy), for the before/after table


def heldout_with_generator(generator, formatter: Formatter, rows: list[dict], max_tokens: int,
                           dist_info: DistInfo, eos_id: int) -> dict | None:
    if not rows:
        return None
    mine = rows[dist_info.rank::dist_info.world_size]
    correct = tokens = truncated = 0
    if mine:
        outs = generator.generate([formatter.prompt_ids(r["problem"]) for r in mine],
                                  Sampling(temperature=0.0, max_tokens=max_tokens), 1)
        for row, (c,) in zip(mine, outs):
            ids = c.token_ids[:-1] if c.token_ids and c.token_ids[-1] == eos_id else c.token_ids
            tokens += len(ids)
            truncated += c.truncated
            correct += answers_match(extract_boxed(c.text), row["answer"])
    n, correct, tokens, truncated = all_reduce_sum([len(mine), correct, tokens, truncated], dist_info.device)
    return {"accuracy": correct / n, "mean_tokens": tokens / n, "truncated": int(truncated), "n": int(n)}


# ---------------------------------------------------------------------------------------------
# The stage


def _init_path(config: Config) -> str:
    g = config.grpo
    if g.init_from != "auto":
        return resolve_model_path(g.init_from, config.run.cache_dir)
    if "sft" in config.run.stages:
        export = Path(config.run.output_dir) / "hf"
        if not export.is_dir():
            raise CheckpointError(f"grpo.init_from=auto expects the SFT export at {export}, which is missing")
        return str(export)
    return resolve_model_path(config.model.name_or_path, config.run.cache_dir)


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
    out_dir = Path(config.run.output_dir) / "grpo"
    main, device, world = dist_info.is_main, dist_info.device, dist_info.world_size
    if g.prompts_per_step % world:
        raise ConfigError(f"grpo.prompts_per_step ({g.prompts_per_step}) must be a multiple of the number of "
                          f"processes ({world})")
    bf16, autocast = mixed_precision(config.model.precision, device)

    ckpt.seed_all(config.run.seed)

    # 1. Policy path, tokenizer, prompts -------------------------------------------------------------------
    init_path = _init_path(config)
    tokenizer = load_tokenizer(init_path, config.model.trust_remote_code)
    formatter = Formatter(tokenizer, config.data.prompt_field, config.data.solution_field, "", config.data.system_prompt)
    checker = AnswerChecker(g.reward_workers, g.reward_timeout_s)
    cleanup = [checker.close]  # also on errors: the worker pool and the generator must not outlive the stage
    try:
        rows, report = load_prompts(config, formatter, checker, progress=main)
        if main:
            print(report.summary(), flush=True)
        return _train(config, dist_info, init_path, tokenizer, formatter, checker, rows, out_dir, autocast, bf16,
                      cleanup)
    finally:
        for close in reversed(cleanup):
            close()


def _train(config, dist_info, init_path, tokenizer, formatter, checker, rows, out_dir, autocast, bf16,
           cleanup: list) -> dict:
    g = config.grpo
    if g.grad_clip is None:
        g = dataclasses.replace(g, grad_clip=config.optim.grad_clip)
    main, device, world = dist_info.is_main, dist_info.device, dist_info.world_size

    # 2. Policy (FSDP), optional frozen reference, optimizer ------------------------------------------------
    loss_options = dict(beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, loss_type=g.loss_type,
                        importance_sampling_level=g.importance_sampling_level,
                        max_completion_length=g.max_completion_length)
    causal_lm = load_causal_lm(init_path, config.model.attn_implementation, config.model.trust_remote_code)
    model = parallelize(PolicyWithGRPOLoss(causal_lm, g.temperature, loss_options), world, device,
                        config.model.activation_checkpointing, config.model.compile, bf16)
    model.train()
    ref_model = None
    if g.beta > 0:
        ref_lm = load_causal_lm(init_path, config.model.attn_implementation, config.model.trust_remote_code)
        ref_lm.requires_grad_(False)
        ref_model = parallelize(PolicyWithGRPOLoss(ref_lm, g.temperature, loss_options), world, device,
                                False, config.model.compile, bf16).eval()
    optimizer = build_optimizer(model, config, lr=g.lr,
                                weight_decay=config.optim.weight_decay if g.weight_decay is None else g.weight_decay)

    # 3. Resume --------------------------------------------------------------------------------------------
    start_step = 0
    resume_from = ckpt.find_resume_point(out_dir, "never" if config.run.resume == "never" else "auto", dist_info)
    found = [resume_from] if resume_from else []
    if found:
        state = ckpt.load_checkpoint(found[-1], model, optimizer, dist_info)
        saved = state["config"]
        current = to_dict(config)
        for key in _RESUME_INVARIANT:
            section, name = key.split(".")
            if saved.get(section, {}).get(name) != current[section][name]:
                raise CheckpointError(f"GRPO checkpoint {found[-1]} was made with {key}="
                                      f"{saved.get(section, {}).get(name)!r}, this run has {current[section][name]!r}")
        start_step = state["step"]
        if main:
            print(f"resumed GRPO from {found[-1]} at step {start_step}", flush=True)

    # 4. Generator (starts from the initial weights; a resumed run pushes the checkpoint's in) ---------------
    generator = make_generator(g.generator, init_path, tokenizer, device,
                               max_model_len=g.max_prompt_length + g.max_completion_length, seed=config.run.seed + dist_info.rank,
                               gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                               cpu_kv_cache_gib=g.vllm_cpu_kv_cache_gib, sleep_mode=g.vllm_sleep,
                               trust_remote_code=config.model.trust_remote_code,
                               enforce_eager=g.vllm_enforce_eager)
    cleanup.append(generator.close)
    sync_dtype = torch.bfloat16 if device.type == "cuda" else None
    bucket_bytes = g.sync_bucket_mib * 2**20

    synced_bytes = [0]

    def counted(weights):
        for name, tensor in weights:
            synced_bytes[0] += tensor.numel() * tensor.element_size()
            yield name, tensor

    def sync() -> float:
        started = time.perf_counter()
        generator.wake()
        synced_bytes[0] = 0
        with torch.no_grad():
            generator.load_weights(counted(gathered_weights(causal_lm, bucket_bytes, sync_dtype)))
        return time.perf_counter() - started

    if start_step:
        sync()

    metrics_path = out_dir / "metrics.jsonl"
    from fastmath.metrics import MetricsWriter

    metrics = MetricsWriter(metrics_path, enabled=main, resume_step=start_step)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
        print(f"GRPO from {init_path}: {g.max_steps} steps x {g.prompts_per_step} prompts x {g.num_generations} "
              f"completions on {world} process(es); generator: {type(generator).__name__}", flush=True)

    # 5. Before: held-out greedy accuracy of the initial policy ---------------------------------------------
    heldout_rows = _heldout_rows(config)
    before_path = out_dir / "before_training.json"
    if start_step == 0:
        before = heldout_with_generator(generator, formatter, heldout_rows, config.heldout.max_new_tokens, dist_info,
                                        tokenizer.eos_token_id)
        if main:
            before_path.write_text(json.dumps(before, indent=2))
    else:
        before = json.loads(before_path.read_text()) if before_path.is_file() else None

    # 6. The loop ------------------------------------------------------------------------------------------
    bar = tqdm(total=g.max_steps, initial=start_step, desc="grpo", disable=not main, dynamic_ncols=True)
    guard, skipped_steps = NonFiniteGuard(g.max_bad_steps, main), 0
    for step in range(start_step, g.max_steps):
        record = {"step": step + 1}
        t0 = time.perf_counter()
        groups, counts = rollout_step(generator, rows, step, config, tokenizer, checker, dist_info)
        t_gen = time.perf_counter() - t0
        sampled = counts.pop("all_sampled", groups)
        generator.sleep()

        # Advantages, sequences, packed rows; every rank runs as many micro-batches as the busiest one.
        t1 = time.perf_counter()
        advantages = advantages_for(groups, config, dist_info)
        seqs = _sequences(groups, advantages, g.mask_truncated)
        batches, n_real, global_tokens, global_seqs = build_update_batches(seqs, g.tokens_per_micro_batch,
                                                                           tokenizer.pad_token_id, device)
        weights = attach_logprobs(model, ref_model, batches, g, autocast)

        result = update_policy(model, optimizer, batches, weights, global_tokens, global_seqs, g, step, world,
                               autocast)
        if result.skipped:
            skipped_steps += 1
            guard.failed(step + 1)
        else:
            guard.ok()
        t_update = time.perf_counter() - t1
        t_sync = sync()

        # Metrics (one reduction for the sums).
        record.update(_step_metrics(sampled, groups, counts, result.stats, config, dist_info, tokenizer))
        update_tokens = all_reduce_sum([sum(b.packed.num_tokens for b in batches[:n_real])], device)[0]
        record.update({"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                       "skipped_steps": skipped_steps,
                       "time/generate_s": t_gen, "time/update_s": t_update, "time/sync_s": t_sync,
                       "generate_tokens_per_s": record["completion_tokens"] / max(t_gen, 1e-9),
                       "update_tokens_per_s": update_tokens * g.num_iterations / max(t_update, 1e-9),
                       "sync_gb_per_s": synced_bytes[0] / 1e9 / max(t_sync, 1e-9),
                       "answer_timeouts": checker.counts["timeout"], "checker_restarts": checker.restarts})
        done = step + 1
        if done % g.log_every == 0 or done == g.max_steps:
            metrics.write(record)  # before the checkpoint that makes this step done
        save_every = config.checkpoint.save_every if g.save_every is None else g.save_every
        if save_every and done % save_every == 0 and done < g.max_steps:
            ckpt.save_checkpoint(out_dir, done, 0, model, optimizer, to_dict(config), dist_info, config.checkpoint.keep)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", acc=f"{record['accuracy']:.2f}",
                        len=f"{record['completion_tokens_mean']:.0f}", kl=f"{record['kl']:.4f}",
                        gen_s=f"{t_gen:.1f}", upd_s=f"{t_update:.1f}", refresh=False)
    bar.close()

    # 7. Final checkpoint, export, held-out after, summary ---------------------------------------------------
    if start_step < g.max_steps:
        ckpt.save_checkpoint(out_dir, g.max_steps, 0, model, optimizer, to_dict(config), dist_info,
                             config.checkpoint.keep)
    export_dir = ckpt.export_hf(causal_lm, tokenizer, out_dir / "hf", dist_info)
    after = heldout_with_generator(generator, formatter, heldout_rows, config.heldout.max_new_tokens, dist_info,
                                   tokenizer.eos_token_id)
    summary = {"stage": "grpo", "steps": g.max_steps, "init_from": init_path, "export": str(export_dir),
               "skipped_steps": skipped_steps, "before": before, "after": after}
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_grpo_summary(summary), flush=True)
    return summary


def _heldout_rows(config: Config) -> list[dict]:
    if config.grpo.prompts != "embedded" or not config.heldout.num_problems:
        return []
    from fastmath.embedded import ensure_embedded_assets

    data_dir = ensure_embedded_assets(config.run.cache_dir or None).data_dir
    with open(data_dir / f"{config.heldout.split}.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[: config.heldout.num_problems]


def _step_metrics(sampled: list[Group], groups: list[Group], counts: dict, stats_total: torch.Tensor,
                  config: Config, dist_info: DistInfo, tokenizer) -> dict:
    """Everything a person watching an RL run needs, summed over ranks once."""
    names = config.grpo.rewards
    flat = [(grp, i) for grp in sampled for i in range(len(grp.completions))]
    lengths = [len(grp.completions[i].token_ids) for grp, i in flat]
    rewards = [grp.rewards[i] for grp, i in flat]
    sums = [len(flat), sum(rewards), sum(r * r for r in rewards),
            sum(1 for grp, i in flat if grp.correct[i]), sum(lengths),
            sum(1 for grp, i in flat if grp.completions[i].truncated),
            sum(1 for grp, i in flat if not grp.completions[i].token_ids or not grp.completions[i].text.strip()),
            counts["groups_sampled"], counts["groups_dropped"], counts["resample_rounds"],
            sum(1 for grp in sampled if grp.zero_variance)]
    for name in names:
        values = [grp.components[name][i] for grp, i in flat]
        sums += [sum(values), sum(v * v for v in values)]
    sums += stats_total.tolist()
    reduced = all_reduce_sum(sums, dist_info.device)
    max_len = all_reduce_max(max(lengths, default=0), dist_info.device)
    n = max(1.0, reduced[0])

    def std(total, squares):
        return math.sqrt(max(0.0, squares / n - (total / n) ** 2))

    out = {"reward/mean": reduced[1] / n, "reward/std": std(reduced[1], reduced[2]),
           "accuracy": reduced[3] / n, "completion_tokens_mean": reduced[4] / n, "completion_tokens_max": max_len,
           "completion_tokens": reduced[4], "truncated_rate": reduced[5] / n, "empty_completions": int(reduced[6]),
           "groups_sampled": int(reduced[7]), "groups_dropped": int(reduced[8]),
           "resample_rounds_max": int(reduced[9]), "zero_variance_groups": int(reduced[10])}
    at = 11
    for name in names:
        out[f"reward/{name}/mean"] = reduced[at] / n
        out[f"reward/{name}/std"] = std(reduced[at], reduced[at + 1])
        at += 2
    tokens, low, high, kl, ratio, entropy = reduced[at:at + 6]
    tokens = max(1.0, tokens)
    out.update({"clip_low_fraction": low / tokens, "clip_high_fraction": high / tokens,
                "clip_region_fraction": (low + high) / tokens, "kl": kl / tokens, "ratio_mean": ratio / tokens,
                "entropy": entropy / tokens})
    return out


def format_grpo_summary(summary: dict) -> str:
    def cell(section, key):
        if not section:
            return "n/a"
        return f"{100 * section['accuracy']:.1f}%" if key == "accuracy" else f"{section['mean_tokens']:.1f}"

    lines = [f"GRPO summary ({summary['steps']} steps; start: {summary['init_from']})",
             f"| {'metric':<28} | {'before GRPO':>11} | {'after GRPO':>11} |",
             f"|{'-' * 30}|{'-' * 13}|{'-' * 13}|"]
    for label, key in (("held-out greedy accuracy", "accuracy"), ("mean completion tokens", "mean_tokens")):
        lines.append(f"| {label:<28} | {cell(summary['before'], key):>11} | {cell(summary['after'], key):>11} |")
    n = (summary.get("after") or {}).get("n")
    if n:
        lines.append(f"(held-out: {n} problems, greedy decoding with the rollout engine; export: {summary['export']})")
    return "\n".join(lines)
