"""Stage 1: supervised fine-tuning on long reasoning traces, packed padding-free.

Commands (the config decides model and data; see configs/*.yaml):
  CPU, embedded default:  torchrun --standalone --nproc_per_node=1 fastmath/train.py --config configs/demo.yaml
  1 GPU:                  torchrun --standalone --nproc_per_node=1 fastmath/train.py --config configs/sft_1.5b_1gpu.yaml
  8 GPUs:                 torchrun --standalone --nproc_per_node=8 fastmath/train.py --config configs/sft_7b_8gpu.yaml

One optimizer step = `sft.global_batch` packed rows across all ranks (each rank runs
global_batch / world_size micro-batches of one row each). The loss of a step is
    sum over every counted token t of the step, on every rank, of -log p(t)  /  (number of such tokens),
so a step's gradient does not depend on how its tokens are split into micro-batches or ranks
(the token-normalised accumulation the recipe needs when rows hold very different numbers of
completion tokens). Each micro-batch's summed loss is scaled by world_size / global_tokens before
backward, because FSDP averages gradients over ranks.

This file is the loop; what every stage does around it (resume, checkpoints, optimizer and schedule, metrics
writers, the held-out check, the summary) is the scaffold's, `fastmath/stage.py`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastmath import checkpoint as ckpt
from fastmath.config import Config
from fastmath.data import Document, Formatter, load_documents, prompt_settings
from fastmath.distributed import DistInfo, all_reduce_sum
from fastmath.errors import ConfigError, FastmathError
from fastmath.metrics import attention_dims, peak_flops, peak_memory_bytes, training_flops
from fastmath.model import (CausalLMWithLinearLoss, count_parameters, export_dtype, lm_head_chunk_bytes,
                            load_parallel_model, load_tokenizer, mixed_precision)
from fastmath.packing import PackedBatch, collate_packed, count_loss_tokens, empty_batch, plan_epoch
from fastmath.stage import (OptimSettings, Stage, accumulate_micro_batches, build_optimizer, clip_gradients,
                            data_source, optim_settings, reduce_named, schedule_length, set_lr, start_model,
                            stepped_parameters)

# Config keys that shape the data order or the update; a resumed run must not change them.
_RESUME_INVARIANT = ("run.seed", "model.name_or_path", "data.train", "data.max_length", "data.overlong",
                     "data.loss_on", "data.max_rows", "sft.epochs", "sft.tokens_per_micro_batch",
                     "sft.global_batch", "sft.lr", "sft.min_lr_ratio", "sft.warmup_ratio", "sft.max_steps",
                     "sft.schedule_epochs", "sft.schedule_steps")


@dataclass
class StepPlan:
    """The whole run's data order: for each global step, its epoch and its packed rows."""

    docs: list[Document]
    rows: list[list[list[int]]]  # per step: global_batch rows (None-padded at the end of an epoch)
    epochs: list[int]
    steps_per_epoch: int = 0  # of the first epoch, before max_steps cuts the plan (for sft.schedule_epochs)

    @property
    def total_steps(self) -> int:
        return len(self.rows)


def plan_steps(docs: list[Document], budget: int, global_batch: int, epochs: int, seed: int,
               max_steps: int) -> StepPlan:
    lengths = [len(d.input_ids) for d in docs]
    rows, epoch_of = [], []
    for epoch in range(epochs):
        for step_rows in plan_epoch(lengths, budget, global_batch, seed, epoch):
            rows.append(step_rows + [None] * (global_batch - len(step_rows)))
            epoch_of.append(epoch)
    first_epoch = epoch_of.count(0)
    if max_steps:
        rows, epoch_of = rows[:max_steps], epoch_of[:max_steps]
    return StepPlan(docs, rows, epoch_of, first_epoch)


def batch_for(plan: StepPlan, row: list[int] | None, pad_id: int) -> PackedBatch:
    if row is None:
        return empty_batch(pad_id)
    return collate_packed([(plan.docs[i].input_ids, plan.docs[i].loss_mask) for i in row])


def accumulate_gradients(model, batches: list[PackedBatch], global_loss_tokens: int, world_size: int,
                         device: torch.device, autocast, gradient_sync: str = "micro_batch") -> torch.Tensor:
    """Backward over this rank's micro-batches; returns their summed (unscaled) loss as a float64 tensor.

    Each micro-batch's summed loss is scaled by world_size / global_loss_tokens: FSDP averages the
    ranks' gradients, so the result is d(sum of all token losses of the step / their count).
    """
    return accumulate_micro_batches(model, batches, lambda _, batch: model(batch.to(device)),
                                    world_size / global_loss_tokens, device, autocast, gradient_sync)


@torch.no_grad()
def validation_loss(model, docs: list[Document], budget: int, dist_info: DistInfo, pad_id: int, autocast) -> float:
    """Token-weighted mean loss over all validation documents, split across ranks."""
    if not docs:
        return float("nan")
    plan = plan_steps(docs, budget, dist_info.world_size, epochs=1, seed=0, max_steps=0)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist_info.device)
    for step_rows in plan.rows:
        batch = batch_for(plan, step_rows[dist_info.rank], pad_id).to(dist_info.device)
        with autocast():
            loss_sum += model(batch).double()
    model.train()
    total_tokens = sum(count_loss_tokens(d.loss_mask) for d in docs)
    (loss,) = all_reduce_sum([loss_sum.item()], dist_info.device)  # host sync + collective, once per validation
    return loss / total_tokens


@dataclass
class Setup:
    """What the loop needs, built once: the model, its data order and the numbers for the metrics."""

    model_path: str
    tokenizer: object
    causal_lm: torch.nn.Module
    model: torch.nn.Module
    plan: StepPlan
    val_docs: list[Document]
    doc_loss_tokens: list[int]
    params: dict
    attention: tuple[int, int]  # (layers, heads * head_dim) for the FLOP count
    autocast: Callable
    bf16: bool


def setup(config: Config, dist_info: DistInfo) -> Setup:
    """Tokenizer, data, the run's data order, and the (FSDP-wrapped) model."""
    main = dist_info.is_main
    bf16, autocast = mixed_precision(config.model.precision, dist_info.device)
    model_path = start_model(config, "sft")
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    d = config.data
    formatter = Formatter(tokenizer, d.prompt_field, d.solution_field, d.messages_field, max_length=d.max_length,
                          overlong=d.overlong, loss_on=d.loss_on, mask_pad_tokens=d.mask_pad_tokens,
                          **prompt_settings(config, "sft"))
    train_docs, report = load_documents(data_source(config, d.train, "train"), d.train_split, formatter, d.max_rows,
                                        progress=main)
    val_docs, val_report = [], None
    if d.validation:
        val_docs, val_report = load_documents(data_source(config, d.validation, "validation"), d.validation_split,
                                              formatter, progress=main)
    if main:
        print(report.summary(), flush=True)
        if val_report:
            print(val_report.summary(), flush=True)
    if config.sft.global_batch % dist_info.world_size:
        raise ConfigError(f"sft.global_batch ({config.sft.global_batch}) must be a multiple of the number of "
                          f"processes ({dist_info.world_size})")
    plan = plan_steps(train_docs, config.sft.tokens_per_micro_batch, config.sft.global_batch, config.sft.epochs,
                      config.run.seed, config.sft.max_steps)
    chunk_bytes = lm_head_chunk_bytes(config.model)
    causal_lm, model = load_parallel_model(model_path, lambda lm: CausalLMWithLinearLoss(lm, chunk_bytes),
                                           config.model, dist_info, bf16, config.parallel.replicate)
    model.train()
    return Setup(model_path, tokenizer, causal_lm, model, plan, val_docs,
                 [count_loss_tokens(doc.loss_mask) for doc in train_docs], count_parameters(causal_lm),
                 attention_dims(causal_lm.config), autocast, bf16)


def run_sft(config: Config, dist_info: DistInfo) -> dict:
    """Train, checkpoint, export; returns the summary (validation loss / held-out check before and after)."""
    stage = Stage("sft", config, dist_info, Path(config.run.output_dir), _RESUME_INVARIANT,
                  heldout=config.data.train == "embedded")
    ckpt.seed_all(config.run.seed)
    s = setup(config, dist_info)
    optim = optim_settings(config, "sft")
    optimizer = build_optimizer(s.model, optim)
    resume = stage.resume(s.model, optimizer)
    tracker = stage.open_outputs(resume.step)
    budget = config.sft.tokens_per_micro_batch
    if dist_info.is_main:
        print(f"model {s.model_path}: {s.params['total'] / 1e6:.2f} M parameters; {s.plan.total_steps} steps of "
              f"{config.sft.global_batch} packed rows x {budget} tokens on {dist_info.world_size} process(es)",
              flush=True)

    def val_loss() -> float:
        return validation_loss(s.model, s.val_docs, budget, dist_info, s.tokenizer.pad_token_id, s.autocast)

    def measure_before() -> dict:
        before = {"val_loss": val_loss(), "heldout": stage.heldout(s.model_path)}
        tracker.write({"step": 0, "val/loss": before["val_loss"]})
        return before

    before = stage.before(resume, measure_before)
    tokens_seen = train(s, config, dist_info, stage, optimizer, optim, resume.step, resume.tokens_seen, val_loss)

    final_step = s.plan.total_steps
    if resume.step < final_step:
        stage.save(final_step, tokens_seen, s.model, optimizer)
    export_dir = ckpt.export_hf(s.causal_lm, s.tokenizer, stage.out_dir / "hf", dist_info,
                                export_dtype(config.model, s.bf16))
    after_val = val_loss()
    tracker.write({"step": final_step, "val/loss": after_val})
    after = {"val_loss": after_val, "heldout": stage.heldout(str(export_dir))}
    return stage.finish({"stage": "sft", "steps": final_step, "tokens_seen": tokens_seen, "start": s.model_path,
                         "export": str(export_dir), "before": before, "after": after})


def train(s: Setup, config: Config, dist_info: DistInfo, stage: Stage, optimizer, optim: OptimSettings,
          start_step: int, tokens_seen: int, val_loss: Callable[[], float]) -> int:
    """The loop: lr, micro-steps, clip, optimizer step, metrics, validation, checkpoint; returns tokens seen."""
    device, world, main = dist_info.device, dist_info.world_size, dist_info.is_main
    plan, per_rank = s.plan, config.sft.global_batch // world
    budget = config.sft.tokens_per_micro_batch
    trainable = stepped_parameters(optimizer)  # not s.model.parameters(): the validation pass left FSDP's root gathered
    peak = peak_flops(device)
    bar = tqdm(total=plan.total_steps, initial=start_step, desc="sft", disable=not main, dynamic_ncols=True)
    horizon = schedule_length(config.sft, plan.total_steps, plan.steps_per_epoch)  # may run past the stop
    for step in range(start_step, plan.total_steps):
        lr = set_lr(optimizer, optim, step, horizon)
        step_rows = plan.rows[step]
        global_loss_tokens = sum(s.doc_loss_tokens[i] for row in step_rows if row for i in row)
        my_rows = step_rows[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
        started = time.perf_counter()

        # Micro-steps: each row's summed loss, scaled so the step's gradient is the global token mean.
        batches = [batch_for(plan, row, s.tokenizer.pad_token_id) for row in my_rows]
        loss_sum = accumulate_gradients(s.model, batches, global_loss_tokens, world, device, s.autocast,
                                        config.parallel.gradient_sync)
        real = [b for b, row in zip(batches, my_rows) if row is not None]
        real_tokens = sum(b.num_tokens for b in real)
        flops = training_flops(s.params["matmul"], real_tokens, [n for b in real for n in b.doc_lengths],
                               *s.attention)

        # Clip, step.
        grad_norm = clip_gradients(trainable, optim)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Metrics: the one host sync of the step (the loss, row/token/FLOP sums over ranks, the grad norm).
        step_sums = reduce_named({"loss": loss_sum, "tokens": real_tokens, "rows": len(real), "flops": flops},
                                 {"grad_norm": grad_norm}, device)
        elapsed = time.perf_counter() - started
        tokens = step_sums["tokens"]
        tokens_seen += int(tokens)
        step_loss = step_sums["loss"] / global_loss_tokens
        per_device = step_sums["flops"] / elapsed / world
        record = {
            "step": step + 1, "epoch": plan.epochs[step], "loss": step_loss, "lr": lr,
            "grad_norm": step_sums["grad_norm"],
            "tokens": int(tokens), "tokens_seen": tokens_seen, "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_device": tokens / elapsed / world, "tflops_per_device": per_device / 1e12,
            "mfu": per_device / peak if peak else None, "peak_memory_gib": peak_memory_bytes(device) / 2**30,
            "packing_efficiency": tokens / max(1, step_sums["rows"] * budget),
        }
        if not math.isfinite(step_loss):
            raise FastmathError(f"training diverged: the loss became {step_loss} at step {step + 1}; "
                                f"try a lower sft.lr or optim.grad_clip")

        # Validation, metrics line, then the checkpoint that makes this step done.
        done = step + 1
        if config.sft.eval_every and done % config.sft.eval_every == 0 and done < plan.total_steps:
            record["val/loss"] = val_loss()
        if done % config.sft.log_every == 0 or done == plan.total_steps or "val/loss" in record:
            stage.tracker.write(record)
        if stage.save_due(done, plan.total_steps):
            stage.save(done, tokens_seen, s.model, optimizer)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        refresh=False)
    bar.close()
    return tokens_seen
