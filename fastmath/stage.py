"""The scaffold every stage stands on: what a stage does around its loop, written once.

A stage file (`sft.py`, `grpo_stage.py`, `eval.py`) holds its loop and imports no other stage. What they share
lives here, so a fix lands once:
    - sources: the model a stage starts from and where 'embedded' data lives;
    - the optimizer (AdamW, torchao's or bitsandbytes' 8-bit AdamW, no decay on biases and norms) and the learning-rate schedule
      (its length may run past the stop), from the shared `optim` section with the stage's own lr and overrides;
    - `Stage`: the stage's output folder (config.json, metrics writers), the resume point and its
      compatibility check (`run.resume` = auto | never | <path>, the same in every stage), checkpoint saves
      and pruning through `checkpoint.py`, the held-out check before and after, and the summary table.

`run.resume=<path>`: in a run with one training stage the path is that stage's; in a run with several, the
stage whose checkpoint folder holds the path resumes from it and the others resume as with 'auto'.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fastmath import checkpoint as ckpt
from fastmath.config import Config, saved_setting, to_dict
from fastmath.distributed import DistInfo
from fastmath.errors import CheckpointError, ConfigError
from fastmath.metrics import MetricsWriter
from fastmath.model import resolve_model_path
from fastmath.fingerprint import input_change, input_fingerprint
from fastmath.output_lock import rank0_decides, refuse_overwrite
from fastmath.tracking import Tracker

TRAINING_STAGES = ("sft", "grpo")

# ---------------------------------------------------------------------------------------------
# Sources


def embedded_data_file(config: Config, split: str) -> str:
    """The embedded data's `<split>.jsonl` (built on first use); for the train split with another
    `data.embedded_verbose_fraction`, the same problems with that share of verbose solutions (written once)."""
    from fastmath.embedded import embedded_train_with_verbose_fraction, ensure_embedded_assets

    assets = ensure_embedded_assets(config.run.cache_dir or None)
    fraction = config.data.embedded_verbose_fraction
    if split == "train" and fraction != 0.5:
        return str(embedded_train_with_verbose_fraction(assets, fraction))
    return str(assets.data_dir / f"{split}.jsonl")


def data_source(config: Config, source: str, split: str) -> str:
    """A data setting as a path or HF id: 'embedded' becomes the embedded data's `split` file."""
    return embedded_data_file(config, split) if source == "embedded" else source


def start_model(config: Config, stage: str) -> str:
    """The model a stage starts from (a local folder or an HF id).

    sft: model.name_or_path. grpo: grpo.init_from, where 'auto' is this run's SFT export when the sft stage is in
    run.stages, else model.name_or_path. eval: eval.model, where 'auto' is the newest export of this run (GRPO's,
    then SFT's), else model.name_or_path.
    """
    chosen = {"sft": "auto", "grpo": config.grpo.init_from, "eval": config.eval.model}[stage]
    if chosen != "auto":
        return resolve_model_path(chosen, config.run.cache_dir)
    out = Path(config.run.output_dir)
    if stage == "grpo" and "sft" in config.run.stages:
        if not (out / "hf").is_dir():
            raise CheckpointError(f"grpo.init_from=auto expects the SFT export at {out / 'hf'}, which is missing")
        return str(out / "hf")
    if stage == "eval":
        for export in (out / "grpo" / "hf", out / "hf"):
            if (export / "config.json").is_file():
                return str(export)
    return resolve_model_path(config.model.name_or_path, config.run.cache_dir)


def stage_inputs(config: Config, stage: str) -> dict[str, str]:
    """What a training stage reads, by setting: its data files, its start model (weights and tokenizer), and a
    chat template file; fingerprinted by content (fastmath/fingerprint.py) and kept with each checkpoint."""
    from fastmath.data import TEMPLATE_DIR

    if stage == "sft":
        d = config.data
        sources = {"data.train": data_source(config, d.train, "train"), "model": start_model(config, "sft")}
        if d.validation:
            sources["data.validation"] = data_source(config, d.validation, "validation")
    else:
        sources = {"grpo.prompts": data_source(config, config.grpo.prompts, "train"),
                   "model": start_model(config, "grpo")}
    template = config.data.chat_template
    if template != "model":
        shipped = TEMPLATE_DIR / f"{template}.jinja"
        sources["data.chat_template"] = str(shipped) if "/" not in template and shipped.is_file() else template
    return sources


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


@dataclass(frozen=True)
class OptimSettings:
    """One stage's optimizer and schedule: its own lr and schedule, the shared rest unless it overrides it."""

    name: str  # adamw | adamw_8bit | paged_adamw_8bit
    lr: float
    warmup_ratio: float
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float  # 0 = no clipping
    betas: tuple[float, float]
    eps: float


def optim_settings(config: Config, stage: str) -> OptimSettings:
    section, shared = getattr(config, stage), config.optim
    return OptimSettings(
        name=shared.name, lr=section.lr, warmup_ratio=section.warmup_ratio, min_lr_ratio=section.min_lr_ratio,
        weight_decay=shared.weight_decay if section.weight_decay is None else section.weight_decay,
        grad_clip=shared.grad_clip if section.grad_clip is None else section.grad_clip,
        betas=(shared.adam_beta1, shared.adam_beta2), eps=shared.adam_eps)


def build_optimizer(model: torch.nn.Module, settings: OptimSettings) -> torch.optim.Optimizer:
    """AdamW (fp32 moments), torchao's 8-bit AdamW (FSDP2-sharded parameters welcome), or bitsandbytes' paged 8-bit
    AdamW (HF Trainer's `paged_adamw_8bit`, the seed's choice; one process); weight decay on matrices only (biases
    and norm scales are vectors and are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.name == "paged_adamw_8bit":
        return paged_adamw_8bit(groups, settings)
    if settings.name == "adamw_8bit":
        return adamw_8bit(groups, settings)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, foreach=True)


def adamw_8bit(groups: list[dict], settings: OptimSettings) -> torch.optim.Optimizer:
    """torchao's AdamW8bit: both moments stored as 8-bit blockwise-quantised tensors (a scale per block of 256
    values), dequantised, updated in fp32 and requantised inside each step. State memory per parameter: 2 bytes plus
    2 x 4 / 256 for the scales, instead of AdamW's 8: for 14.8 B parameters on 8 GPUs, 3.5 GiB per GPU instead of
    13.8. Its states are tensor subclasses that FSDP2's DTensor parameters carry shard by shard (torchao builds
    them for FSDP2), so it runs on sharded parameters, on CUDA and on the CPU. Tensors smaller than 4,096 values
    (norm scales, biases) keep fp32 moments (torchao's default)."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError("optim.name=adamw_8bit needs torchao (pip install torchao), which is not installed; or "
                          "use optim.name=adamw") from None
    return AdamW8bit(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)


def paged_adamw_8bit(groups: list[dict], settings: OptimSettings) -> torch.optim.Optimizer:
    """bitsandbytes' PagedAdamW8bit: 8-bit blockwise optimizer states in paged (unified) memory. CUDA only, and
    one process only: its update kernels take plain tensors, not FSDP2's sharded DTensor parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in groups for p in group["params"]]
    if any(isinstance(p, DTensor) for p in params):
        raise ConfigError("optim.name=paged_adamw_8bit cannot update FSDP-sharded parameters (bitsandbytes' 8-bit "
                          "optimizers take plain tensors, not DTensors: bitsandbytes issue #1633); with several "
                          "processes use optim.name=adamw_8bit (torchao's, built for FSDP2) or adamw")
    devices = {p.device.type for p in params}
    if devices != {"cuda"}:
        raise ConfigError(f"optim.name=paged_adamw_8bit needs the model on CUDA (bitsandbytes' paged 8-bit AdamW); "
                          f"the parameters are on {', '.join(sorted(devices)) or 'no device'}: use "
                          f"optim.name=adamw_8bit or adamw")
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("optim.name=paged_adamw_8bit needs bitsandbytes (pip install bitsandbytes), which is not "
                          "installed; or use optim.name=adamw_8bit") from None
    return bitsandbytes.optim.PagedAdamW8bit(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)


def schedule_length(section, run_steps: int, steps_per_epoch: int = 0, prompt_rows: int = 0) -> int:
    """The learning-rate schedule's length in optimizer steps, which may run past where the stage stops.

    schedule_steps > 0: that many. schedule_steps = -1 (GRPO): one pass over the prompt rows,
    floor(rows / prompts_per_step), as the seed's trainer sizes its cosine. schedule_epochs > 0 (SFT):
    ceil(schedule_epochs * steps_per_epoch), as HF Trainer counts num_train_epochs. Otherwise the run's own length.
    """
    steps = getattr(section, "schedule_steps", 0)
    epochs = getattr(section, "schedule_epochs", 0.0)
    if steps > 0:
        return steps
    if steps == -1:
        return max(1, prompt_rows // section.prompts_per_step)
    if epochs > 0:
        return max(1, math.ceil(epochs * steps_per_epoch))
    return run_steps


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of a schedule `total` steps long.

    Linear warmup over ceil(warmup_ratio * total) steps (HF Trainer's count; its rate at step s is s / warmup,
    here (s + 1) / warmup, so no step runs at rate 0), then cosine from `peak` down to min_ratio * peak at `total`:
        lr = peak * (min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2),  p = (step - warmup) / (total - warmup)
    (HF's `get_cosine_schedule_with_warmup` when min_ratio = 0). p is held at 1 past the end of the schedule.
    """
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, settings: OptimSettings, step: int, total: int) -> float:
    lr = lr_at(step, total, settings.lr, settings.warmup_ratio, settings.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def stepped_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates: what the gradient clip must see, every step.

    Not `model.parameters()` read at some moment: under FSDP2 a module's registered parameters are the sharded
    ones only while it is resharded. The root module (embeddings, final norm, LM head) is not resharded after its
    forward, expecting the backward; after a forward with no backward (a no-grad log-prob pass, a validation loss)
    it stays gathered, with unsharded tensors registered in place of the sharded parameters until the next
    backward ends. A list taken then holds tensors that never get a gradient: the clip would leave those
    parameters out of the norm and unscaled (seen: a 2-process GRPO step reported 1.25 for a norm of 1.43)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_gradients(params: list[torch.Tensor], settings: OptimSettings) -> torch.Tensor:
    """Clip the global gradient norm (no-op bound when grad_clip is 0); returns the norm as a device tensor
    (no host sync here: the caller reads it with the step's other numbers)."""
    norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2


def micro_batches(model: torch.nn.Module, batches: list, gradient_sync: str):
    """The micro-batches of one optimizer step, with FSDP2's gradient reduction set before each backward.

    gradient_sync 'micro_batch' (parallel.gradient_sync): every backward reduce-scatters, so each rank holds only
    its shard of the fp32 gradient, 4 * P / W bytes for P parameters on W ranks (ZeRO-2/3's and torchtitan's
    behaviour). 'step': only the last backward reduces; before it every rank accumulates the full unsharded fp32
    gradient, 4 * P bytes (55 GiB at 14.8 B parameters, whatever W), in exchange for one reduce-scatter per step
    instead of one per micro-batch. Both give the same gradient: the reduction is a sum, linear in the micro-batches.
    """
    fsdp = hasattr(model, "set_requires_gradient_sync")
    last = len(batches) - 1
    for micro, batch in enumerate(batches):
        if fsdp:
            model.set_requires_gradient_sync(gradient_sync == "micro_batch" or micro == last)
        yield micro, batch


def accumulate_micro_batches(model: torch.nn.Module, batches: list, forward, scale: float, device: torch.device,
                             autocast, gradient_sync: str, loss_weight: float = 1.0) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches (every stage's accumulation loop); returns the
    sum of their losses, each times `loss_weight`, as a float64 device scalar (no host sync).

    forward(micro, batch) runs under autocast and returns the micro-batch's loss (a scalar); backward takes
    loss * scale, the factor that makes it the micro-batch's share of the step's gradient (the stage's
    normalisation, times the world size where FSDP averages gradients over ranks). When FSDP reduces the
    gradients is parallel.gradient_sync (`micro_batches`)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro, batch in micro_batches(model, batches, gradient_sync):
        with autocast():
            loss = forward(micro, batch)
        (loss * scale).backward()
        loss_sum += loss.detach().double() * loss_weight
    return loss_sum


def reduce_named(sums: dict[str, torch.Tensor | float], values: dict[str, torch.Tensor],
                 device: torch.device) -> dict[str, float]:
    """A step's numbers on the host, by name, with one collective and one host sync: `sums` (device scalars or
    host numbers) summed over ranks, then `values` (device scalars already global, e.g. the clipped gradient
    norm) as they are. The host numbers travel to the device in one copy; every name comes back as a float."""
    on_device = [name for name, v in sums.items() if isinstance(v, torch.Tensor)]
    on_host = [name for name, v in sums.items() if not isinstance(v, torch.Tensor)]
    parts = [torch.zeros(0, dtype=torch.float64, device=device)]
    if on_device:
        parts.append(torch.stack([sums[name].double() for name in on_device]))
    if on_host:
        parts.append(torch.tensor([sums[name] for name in on_host], dtype=torch.float64).to(device))
    summed = torch.cat(parts)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(summed)
    if values:
        summed = torch.cat([summed, torch.stack([t.double() for t in values.values()])])
    return dict(zip([*on_device, *on_host, *values], summed.tolist()))  # the host sync


# ---------------------------------------------------------------------------------------------
# The stage


def check_resume_compatible(saved: dict, config: Config, path: Path, invariant: tuple[str, ...]) -> None:
    """A resumed stage must not change what shapes its data order or update; the first change is named. A key the
    checkpoint's config lacks (it predates the key) counts as the key's default, which is how that run behaved."""
    current, defaults = to_dict(config), to_dict(Config())
    for key in invariant:
        try:
            old = saved_setting(saved, key)
        except KeyError:
            old = saved_setting(defaults, key)
        new = saved_setting(current, key)
        if old != new:
            raise CheckpointError(f"checkpoint {path} was made with {key}={old!r}, this run has {new!r}; "
                                  f"resume with the same value or use a fresh run.output_dir")


@dataclass
class ResumePoint:
    step: int = 0
    tokens_seen: int = 0
    path: Path | None = None


class Stage:
    """One stage's folder, resume point, checkpoints, metrics writers and held-out check.

    out_dir: the stage's folder (run.output_dir for sft, run.output_dir/grpo for grpo). invariant: the config
    keys a resumed stage must keep. heldout: whether the held-out check applies (the embedded data only).
    """

    def __init__(self, name: str, config: Config, dist_info: DistInfo, out_dir: Path,
                 invariant: tuple[str, ...], heldout: bool):
        self.name, self.config, self.dist_info, self.out_dir = name, config, dist_info, Path(out_dir)
        self.invariant = invariant
        self.heldout_on = heldout and config.heldout.num_problems > 0
        section = getattr(config, name)
        self.save_every = config.checkpoint.save_every if section.save_every is None else section.save_every
        self.tracker: Tracker | None = None
        self.inputs: dict | None = None  # fingerprints of what the stage reads (rank 0), stored with checkpoints

    # -- resume -------------------------------------------------------------------------------------------

    def _resume_mode(self) -> str:
        mode = self.config.run.resume
        if mode in ("auto", "never"):
            return mode
        training = [s for s in self.config.run.stages if s in TRAINING_STAGES]
        own_root = ckpt.checkpoint_root(self.out_dir).resolve()
        if len(training) > 1 and Path(mode).resolve().parent != own_root:
            return "auto"  # the path belongs to another stage of this run
        return mode

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ResumePoint:
        """Load the checkpoint run.resume picks (none for a fresh start) and check it fits this config."""
        mode = self._resume_mode()
        if self.dist_info.is_main:
            self.inputs = {key: input_fingerprint(source) for key, source in stage_inputs(self.config, self.name).items()}
        path = ckpt.find_resume_point(self.out_dir, mode, self.dist_info)
        if path is None:
            refuse_overwrite(self.out_dir, mode, self.dist_info.is_main)  # a fresh start replaces nothing
            return ResumePoint()
        state = ckpt.load_checkpoint(path, model, optimizer, self.dist_info)
        check_resume_compatible(state["config"], self.config, path, self.invariant)
        change = rank0_decides(input_change(state.get("inputs"), self.inputs) if self.dist_info.is_main else None)
        if change:
            raise CheckpointError(f"checkpoint {path} was made from other inputs: {change}; resume with the same "
                                  f"content, or start over in a fresh run.output_dir")
        if self.dist_info.is_main:
            print(f"resumed {self.name.upper()} from {path} at step {state['step']}", flush=True)
        return ResumePoint(state["step"], state.get("tokens_seen", 0), path)

    # -- outputs ------------------------------------------------------------------------------------------

    def open_outputs(self, resume_step: int) -> Tracker:
        """The folder with config.json, and the metrics writers (metrics.jsonl cut back to the resume step)."""
        main = self.dist_info.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2))
        self.tracker = metrics_tracker(self.config, self.out_dir, self.name, resume_step, enabled=main)
        return self.tracker

    def save_due(self, done: int, total: int) -> bool:
        """A periodic checkpoint after step `done` (the final one is saved by `save` after the loop)."""
        return bool(self.save_every) and done % self.save_every == 0 and done < total

    def save(self, step: int, tokens_seen: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
        """Checkpoint; checkpoint.py prunes to checkpoint.keep of this run's own, never its newest."""
        return ckpt.save_checkpoint(self.out_dir, step, tokens_seen, model, optimizer, to_dict(self.config),
                                    self.dist_info, self.config.checkpoint.keep, inputs=self.inputs)

    # -- held-out check -----------------------------------------------------------------------------------

    def heldout(self, model_path: str) -> dict | None:
        """The held-out greedy check of the model saved at `model_path` (None when the check is off)."""
        if not self.heldout_on:
            return None
        from fastmath.heldout import heldout_accuracy

        return heldout_accuracy(model_path, self.config, self.dist_info)

    def before(self, resume: ResumePoint, measure) -> dict:
        """The 'before' column: measured at a fresh start (measure() -> dict) and kept in before_training.json,
        read back when the stage resumes."""
        path = self.out_dir / "before_training.json"
        if resume.step == 0:
            before = measure()
            if self.dist_info.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(before, indent=2))
            return before
        try:
            before = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError, RecursionError) as err:
            raise CheckpointError(f"{path} is not the JSON fastmath wrote ({str(err)[:120]}); move it away to "
                                  f"measure the 'before' column again") from None
        return before if isinstance(before, dict) else {}

    def finish(self, summary: dict) -> dict:
        """Write summary.json, print the before/after table, close the metrics writers."""
        if self.dist_info.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(format_summary(summary), flush=True)
        if self.tracker is not None:
            self.tracker.close()
        return summary


def metrics_tracker(config: Config, out_dir: Path, stage: str, resume_step: int, enabled: bool) -> Tracker:
    """A stage's metrics writers: out_dir/metrics.jsonl (cut back to `resume_step`; 0 empties it) and the trackers
    of run.report_to, opened now so that a missing tracker package is named before any work; rank 0 writes."""
    jsonl = MetricsWriter(out_dir / "metrics.jsonl", enabled=enabled, resume_step=resume_step)
    return Tracker(jsonl, out_dir, config.run.report_to, config.run.name, stage, to_dict(config), resume_step,
                   enabled=enabled)


def format_summary(summary: dict) -> str:
    """The before/after table of a training stage, for the console."""
    stage = summary["stage"].upper()

    def cell(column: dict | None, key: str) -> str:
        column = column or {}
        if key == "val_loss":
            value = column.get("val_loss")
            return "n/a" if value is None or value != value else f"{value:.4f}"
        heldout = column.get("heldout")
        if not heldout:
            return "n/a"
        return f"{100 * heldout['accuracy']:.1f}%" if key == "accuracy" else f"{heldout['mean_tokens']:.1f}"

    before, after = f"before {stage}", f"after {stage}"
    width = max(len(before), len(after), 10)
    lines = [f"{stage} summary ({summary['steps']} steps, {summary['tokens_seen']} tokens; "
             f"start: {summary['start']})",
             f"| {'metric':<28} | {before:>{width}} | {after:>{width}} |",
             f"|{'-' * 30}|{'-' * (width + 2)}|{'-' * (width + 2)}|"]
    rows = [("held-out greedy accuracy", "accuracy"), ("mean completion tokens", "mean_tokens")]
    if "val_loss" in (summary.get("after") or {}):
        rows.insert(0, ("validation loss", "val_loss"))
    for label, key in rows:
        lines.append(f"| {label:<28} | {cell(summary['before'], key):>{width}} | "
                     f"{cell(summary['after'], key):>{width}} |")
    n = ((summary.get("after") or {}).get("heldout") or {}).get("n")
    if n:
        lines.append(f"(held-out: {n} problems, greedy decoding; export: {summary['export']})")
    return "\n".join(lines)
