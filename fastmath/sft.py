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
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastmath import checkpoint as ckpt
from fastmath.config import Config, to_dict
from fastmath.data import Document, Formatter, load_documents
from fastmath.distributed import DistInfo, all_reduce_sum, barrier
from fastmath.errors import CheckpointError, ConfigError, FastmathError
from fastmath.metrics import MetricsWriter, attention_dims, peak_flops, peak_memory_bytes, training_flops
from fastmath.model import (CausalLMWithLinearLoss, count_parameters, load_causal_lm, load_tokenizer, mixed_precision,
                            parallelize, resolve_model_path)
from fastmath.packing import PackedBatch, collate_packed, count_loss_tokens, empty_batch, plan_epoch

# Config keys that shape the data order or the update; a resumed run must not change them.
_RESUME_INVARIANT = ("run.seed", "model.name_or_path", "data.train", "data.max_length", "data.overlong",
                     "data.loss_on", "data.max_rows", "sft.epochs", "sft.tokens_per_micro_batch",
                     "sft.global_batch", "sft.lr", "sft.min_lr_ratio", "sft.warmup_ratio", "sft.max_steps")


@dataclass
class StepPlan:
    """The whole run's data order: for each global step, its epoch and its packed rows."""

    docs: list[Document]
    rows: list[list[list[int]]]  # per step: global_batch rows (None-padded at the end of an epoch)
    epochs: list[int]

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
    if max_steps:
        rows, epoch_of = rows[:max_steps], epoch_of[:max_steps]
    return StepPlan(docs, rows, epoch_of)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over round(warmup_ratio * total) steps, then cosine down to min_ratio * peak."""
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, config: Config, lr: float | None = None,
                    weight_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW with the optim.* settings; lr / weight decay default to sft's (GRPO passes its own)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    wd = config.optim.weight_decay if config.sft.weight_decay is None else config.sft.weight_decay
    wd = wd if weight_decay is None else weight_decay
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.sft.lr if lr is None else lr,
                             betas=(config.optim.adam_beta1, config.optim.adam_beta2), eps=config.optim.adam_eps,
                             foreach=True)


def batch_for(plan: StepPlan, row: list[int] | None, pad_id: int) -> PackedBatch:
    if row is None:
        return empty_batch(pad_id)
    return collate_packed([(plan.docs[i].input_ids, plan.docs[i].loss_mask) for i in row])


def accumulate_gradients(model, batches: list[PackedBatch], global_loss_tokens: int, world_size: int,
                         device: torch.device, autocast) -> torch.Tensor:
    """Backward over this rank's micro-batches; returns their summed (unscaled) loss as a float64 tensor.

    Each micro-batch's summed loss is scaled by world_size / global_loss_tokens: FSDP averages the
    ranks' gradients, so the result is d(sum of all token losses of the step / their count). FSDP's
    gradient reduction runs only after the last micro-batch.
    """
    fsdp = hasattr(model, "set_requires_gradient_sync")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro, batch in enumerate(batches):
        if fsdp:
            model.set_requires_gradient_sync(micro == len(batches) - 1)
        with autocast():
            loss = model(batch.to(device))
        (loss * (world_size / global_loss_tokens)).backward()
        loss_sum += loss.detach().double()
    return loss_sum


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
    (loss,) = all_reduce_sum([loss_sum.item()], dist_info.device)
    return loss / total_tokens


def _embedded_heldout_rows(config: Config) -> list[dict]:
    from fastmath.embedded import ensure_embedded_assets

    data_dir = ensure_embedded_assets(config.run.cache_dir or None).data_dir
    with open(data_dir / f"{config.heldout.split}.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[: config.heldout.num_problems]


def heldout_accuracy(model_path: str, tokenizer, formatter: Formatter, rows: list[dict], config: Config,
                     dist_info: DistInfo) -> dict | None:
    """Greedy accuracy of the model saved at `model_path`, computed on rank 0 (others wait)."""
    from fastmath.heldout import greedy_accuracy

    result = None
    if dist_info.is_main and rows:
        model = load_causal_lm(model_path, "sdpa", config.model.trust_remote_code).to(dist_info.device)
        result = greedy_accuracy(model, tokenizer, formatter, rows, config.heldout.max_new_tokens,
                                 config.heldout.batch_size, dist_info.device, progress=True)
        del model
    barrier()
    return result


def _check_resume_compatible(saved: dict, config: Config, path: Path) -> None:
    current = to_dict(config)
    for key in _RESUME_INVARIANT:
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name), current[section][name]
        if old != new:
            raise CheckpointError(f"checkpoint {path} was made with {key}={old!r}, this run has {new!r}; "
                                  f"resume with the same value or use a fresh run.output_dir")


def run_sft(config: Config, dist_info: DistInfo) -> dict:
    """Train, checkpoint, export; returns the summary (validation loss / accuracy before and after)."""
    out_dir = Path(config.run.output_dir)
    main = dist_info.is_main
    device = dist_info.device
    bf16, autocast = mixed_precision(config.model.precision, device)

    # 1. Seeds, model path, tokenizer, data -------------------------------------------------------------
    ckpt.seed_all(config.run.seed)
    model_path = resolve_model_path(config.model.name_or_path, config.run.cache_dir)
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    formatter = Formatter(tokenizer, config.data.prompt_field, config.data.solution_field, config.data.messages_field,
                          config.data.system_prompt, config.data.max_length, config.data.overlong,
                          config.data.loss_on)
    train_source, val_source = _data_sources(config)
    train_docs, report = load_documents(train_source, config.data.train_split, formatter, config.data.max_rows,
                                        progress=main)
    val_docs, val_report = ([], None)
    if val_source:
        val_docs, val_report = load_documents(val_source, config.data.validation_split, formatter, progress=main)
    if main:
        print(report.summary(), flush=True)
        if val_report:
            print(val_report.summary(), flush=True)

    # 2. The data order of the whole run ----------------------------------------------------------------
    if config.sft.global_batch % dist_info.world_size:
        raise ConfigError(f"sft.global_batch ({config.sft.global_batch}) must be a multiple of the number of "
                          f"processes ({dist_info.world_size})")
    per_rank = config.sft.global_batch // dist_info.world_size
    budget = config.sft.tokens_per_micro_batch
    plan = plan_steps(train_docs, budget, config.sft.global_batch, config.sft.epochs, config.run.seed,
                      config.sft.max_steps)
    doc_loss_tokens = [count_loss_tokens(d.loss_mask) for d in train_docs]

    # 3. Model, parallelism, optimizer ------------------------------------------------------------------
    causal_lm = load_causal_lm(model_path, config.model.attn_implementation, config.model.trust_remote_code)
    n_layers, d_attn = attention_dims(causal_lm.config)
    params = count_parameters(causal_lm)
    model = parallelize(CausalLMWithLinearLoss(causal_lm, config.sft.loss_chunk_size), dist_info.world_size,
                        device, config.model.activation_checkpointing, config.model.compile, bf16)
    model.train()
    optimizer = build_optimizer(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    peak = peak_flops(device)

    # 4. Resume ------------------------------------------------------------------------------------------
    start_step, tokens_seen = 0, 0
    resume_from = ckpt.find_resume_point(config.run.output_dir, config.run.resume, dist_info)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, dist_info)
        _check_resume_compatible(state["config"], config, resume_from)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        if main:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    metrics = MetricsWriter(out_dir / "metrics.jsonl", enabled=main, resume_step=start_step)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
        print(f"model {model_path}: {params['total'] / 1e6:.2f} M parameters; {plan.total_steps} steps of "
              f"{config.sft.global_batch} packed rows x {budget} tokens on {dist_info.world_size} process(es)",
              flush=True)

    # 5. Before training: validation loss and held-out greedy accuracy ----------------------------------
    heldout_rows = _embedded_heldout_rows(config) if config.data.train == "embedded" and config.heldout.num_problems else []
    before_path = out_dir / "before_training.json"
    if start_step == 0:
        before = {"val_loss": validation_loss(model, val_docs, budget, dist_info, tokenizer.pad_token_id, autocast),
                  "heldout": heldout_accuracy(model_path, tokenizer, formatter, heldout_rows, config, dist_info)}
        if main:
            before_path.write_text(json.dumps(before, indent=2))
            metrics.write({"step": 0, "val/loss": before["val_loss"]})
    else:
        before = json.loads(before_path.read_text()) if before_path.is_file() else {"val_loss": None, "heldout": None}

    # 6. The loop ----------------------------------------------------------------------------------------
    bar = tqdm(total=plan.total_steps, initial=start_step, desc="sft", disable=not main, dynamic_ncols=True)
    step = start_step
    for step in range(start_step, plan.total_steps):
        lr = lr_at(step, plan.total_steps, config.sft.lr, config.sft.warmup_ratio, config.sft.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_rows = plan.rows[step]
        global_loss_tokens = sum(doc_loss_tokens[i] for row in step_rows if row for i in row)
        my_rows = step_rows[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
        started = time.perf_counter()

        # Micro-steps: each row's summed loss, scaled so the step's gradient is the global token mean.
        batches = [batch_for(plan, row, tokenizer.pad_token_id) for row in my_rows]
        loss_sum = accumulate_gradients(model, batches, global_loss_tokens, dist_info.world_size, device, autocast)
        real = [b for b, row in zip(batches, my_rows) if row is not None]
        real_tokens, used_rows = sum(b.num_tokens for b in real), len(real)
        doc_lengths = [n for b in real for n in b.doc_lengths]

        # Clip, step.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, (config.optim.grad_clip if config.sft.grad_clip is None else config.sft.grad_clip) or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Metrics: the one host sync of the step.
        flops = training_flops(params["matmul"], real_tokens, doc_lengths, n_layers, d_attn)
        loss_total, tokens, rows_total, flops_total = all_reduce_sum(
            [loss_sum.item(), real_tokens, used_rows, flops], device)
        elapsed = time.perf_counter() - started
        tokens_seen += int(tokens)
        step_loss = loss_total / global_loss_tokens
        record = {
            "step": step + 1, "epoch": plan.epochs[step], "loss": step_loss, "lr": lr,
            "grad_norm": float(grad_norm), "tokens": int(tokens), "tokens_seen": tokens_seen,
            "tokens_per_s": tokens / elapsed, "tokens_per_s_per_device": tokens / elapsed / dist_info.world_size,
            "tflops_per_device": flops_total / elapsed / dist_info.world_size / 1e12,
            "mfu": (flops_total / elapsed / dist_info.world_size / peak) if peak else None,
            "peak_memory_gib": peak_memory_bytes(device) / 2**30,
            "packing_efficiency": tokens / max(1, rows_total * budget),
        }
        if not math.isfinite(step_loss):
            raise FastmathError(f"training diverged: the loss became {step_loss} at step {step + 1}; "
                                f"try a lower sft.lr or sft.grad_clip")

        # Validation and checkpoints.
        done = step + 1
        if config.sft.eval_every and done % config.sft.eval_every == 0 and done < plan.total_steps:
            record["val/loss"] = validation_loss(model, val_docs, budget, dist_info, tokenizer.pad_token_id,
                                                 autocast)
        if done % config.sft.log_every == 0 or done == plan.total_steps or "val/loss" in record:
            metrics.write(record)  # before the checkpoint that makes this step done
        save_every = config.checkpoint.save_every if config.sft.save_every is None else config.sft.save_every
        if save_every and done % save_every == 0 and done < plan.total_steps:
            ckpt.save_checkpoint(out_dir, done, tokens_seen, model, optimizer, to_dict(config), dist_info,
                                 config.checkpoint.keep)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        refresh=False)
    bar.close()

    # 7. Final checkpoint, export, after-training evaluation, summary -------------------------------------
    final_step = plan.total_steps
    if start_step < final_step:
        ckpt.save_checkpoint(out_dir, final_step, tokens_seen, model, optimizer, to_dict(config), dist_info,
                             config.checkpoint.keep)
    export_dir = ckpt.export_hf(causal_lm, tokenizer, out_dir / "hf", dist_info)
    after_val = validation_loss(model, val_docs, budget, dist_info, tokenizer.pad_token_id, autocast)
    if main:
        metrics.write({"step": final_step, "val/loss": after_val})
    after = {"val_loss": after_val,
             "heldout": heldout_accuracy(str(export_dir), tokenizer, formatter, heldout_rows, config, dist_info)}
    summary = {"stage": "sft", "steps": final_step, "tokens_seen": tokens_seen, "export": str(export_dir),
               "before": before, "after": after}
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary), flush=True)
    return summary


def _data_sources(config: Config) -> tuple[str, str]:
    """Resolve 'embedded' to the generated jsonl files."""
    train, val = config.data.train, config.data.validation
    if "embedded" in (train, val):
        from fastmath.embedded import ensure_embedded_assets

        data_dir = ensure_embedded_assets(config.run.cache_dir or None).data_dir
        train = str(data_dir / "train.jsonl") if train == "embedded" else train
        val = str(data_dir / "validation.jsonl") if val == "embedded" else val
    return train, val


def format_summary(summary: dict) -> str:
    """A small before/after table for the console."""
    def cell(section: dict, key: str) -> str:
        if key == "val_loss":
            value = section.get("val_loss")
            return "n/a" if value is None or value != value else f"{value:.4f}"
        heldout = section.get("heldout")
        if not heldout:
            return "n/a"
        return f"{100 * heldout['accuracy']:.1f}%" if key == "accuracy" else f"{heldout['mean_tokens']:.1f}"

    lines = [f"SFT summary ({summary['steps']} steps, {summary['tokens_seen']} tokens)",
             f"| {'metric':<28} | {'before SFT':>10} | {'after SFT':>10} |",
             f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|"]
    for label, key in (("validation loss", "val_loss"), ("held-out greedy accuracy", "accuracy"),
                       ("mean solution tokens", "mean_tokens")):
        lines.append(f"| {label:<28} | {cell(summary['before'], key):>10} | {cell(summary['after'], key):>10} |")
    n = (summary["after"].get("heldout") or {}).get("n")
    if n:
        lines.append(f"(held-out: {n} problems, greedy decoding; export: {summary['export']})")
    return "\n".join(lines)
