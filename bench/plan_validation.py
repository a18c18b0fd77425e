"""The memory planner held to a real run: a real 2-process (gloo) SFT step on the CPU against the plan's prediction.

    .venv/bin/python bench/plan_validation.py                 # the recorded case: a 22 M-parameter Qwen2, 2 ranks,
                                                              # 4 micro-batches of 1024 tokens; appends a record
    .venv/bin/python bench/plan_validation.py --quick         # a small case, printed only (the suite's test runs it)

What is measured: `torchrun --nproc_per_node=2` runs the trainer's own code for two optimizer steps (the model
built on meta and loaded shard by shard from safetensors, FSDP2, activation checkpointing, the fused LM-head loss,
gradients reduce-scattered every micro-batch, clipping, AdamW) on real tensors with real gloo collectives, from
before the model exists, two ways at once:
    storages   the bytes of every live tensor storage of the training thread (`fastmath.memory_tracker` on real
               tensors: each storage counted from its creation until it is freed, whichever thread frees it);
               its maximum during step 2 is the measured peak the plan is held to.
    profiler   PyTorch's profiler with memory profiling: the allocator's own events, running-summed. It records
               the training thread only, so a tensor that a gloo worker thread frees (timing decides which thread
               drops the last reference) never leaves the sum: an upper bound that varies run to run. Recorded
               beside the other (its lowest rank), not held to.

What is predicted: `fastmath.planner.simulate_stage` for the same config at world size 2 on the CPU (the
reference kernels the real run takes there; no Triton simulation), rank 0's peak of step 2.

The record (bench/results/plan_validation-cpu.json) keeps both, per rank, and the ratio; the planner is held to
within 10% of the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# (model shape, config overrides) of each case.
CASES = {
    "recorded": (dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8192),
                 ["sft.tokens_per_micro_batch=1024", "sft.global_batch=8", "data.max_length=256",
                  "model.activation_checkpointing=true"]),
    "quick": (dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048),
              ["sft.tokens_per_micro_batch=256", "sft.global_batch=4", "data.max_length=64",
               "model.activation_checkpointing=true"]),
}
TOLERANCE = 0.10


def make_model_folder(shape: dict, folder: Path) -> Path:
    """A randomly initialised Qwen2 of `shape`, saved as safetensors (config.json + model.safetensors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=True, **shape)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def config_for(model_dir: Path, overrides: list[str]):
    from fastmath.config import load_config

    return load_config(None, [f"model.name_or_path={model_dir}", "model.attn_implementation=fastmath_varlen",
                              "model.liger=never", *overrides])


# ---------------------------------------------------------------------------------------------
# The real run (one rank of torchrun)


def worker(model_dir: str, overrides: list[str], out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    from fastmath.distributed import init_distributed, shutdown
    from fastmath.memory_tracker import MemoryTimeline
    from fastmath.model import CausalLMWithLinearLoss, lm_head_chunk_bytes, load_parallel_model, mixed_precision
    from fastmath.planner import _sft_batches
    from fastmath.sft import accumulate_gradients
    from fastmath.stage import build_optimizer, clip_gradients, optim_settings

    info = init_distributed()
    config = config_for(Path(model_dir), overrides)
    bf16, autocast = mixed_precision(config.model.precision, info.device)
    n_micro = config.sft.global_batch // info.world_size
    batch = _sft_batches(config)
    tokens = batch.num_tokens * n_micro * info.world_size
    tracker = MemoryTimeline()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, tracker:
        chunk = lm_head_chunk_bytes(config.model)
        _, model = load_parallel_model(model_dir, lambda lm: CausalLMWithLinearLoss(lm, chunk), config.model, info,
                                       bf16, config.parallel.replicate)
        model.train()  # as the trainer does: from_pretrained returns eval mode, where HF skips checkpointing
        optimizer = build_optimizer(model, optim_settings(config, "sft"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        for step in range(2):
            if step == 1:
                resident = tracker.total
                tracker.reset_peak()
            with record_function(f"plan_validation_step_{step + 1}"):
                accumulate_gradients(model, [batch] * n_micro, tokens, info.world_size, info.device, autocast,
                                     config.parallel.gradient_sync)
                clip_gradients(trainable, optim_settings(config, "sft"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    peaks = {"peak_step_2": tracker.peak, "live_before_step_2": resident,
             "profiler": _peaks_by_step(prof)}
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(peaks))
    shutdown()


def _peaks_by_step(prof) -> dict:
    """The largest running sum of the allocator's events (allocations +, frees -) within each step's range."""
    raw = prof.profiler.kineto_results.events()
    ranges = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in raw
              if e.name().startswith("plan_validation_step_")}
    memory = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]")
    live, peaks, before = 0, {name: 0 for name in ranges}, {}
    for start, delta in memory:
        for name, (lo, _) in ranges.items():
            if start >= lo and name not in before:
                before[name] = live
        live += delta
        for name, (lo, hi) in ranges.items():
            if lo <= start <= hi:
                peaks[name] = max(peaks[name], live)
    return {"peak_step_1": peaks.get("plan_validation_step_1", 0), "peak_step_2": peaks.get("plan_validation_step_2", 0),
            "live_before_step_2": before.get("plan_validation_step_2", 0), "events": len(memory)}


def measure(model_dir: Path, overrides: list[str], out_dir: Path, nproc: int = 2) -> list[dict]:
    """Run the real step on `nproc` processes; returns each rank's measured peaks."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "--worker", str(model_dir), str(out_dir), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the real run failed: {done.stderr[-2000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


def predict(model_dir: Path, overrides: list[str], nproc: int = 2):
    from fastmath.planner import simulate_stage

    return simulate_stage(config_for(model_dir, overrides), "sft", world_size=nproc, gpu=False)


def compare(case: str, nproc: int = 2) -> dict:
    shape, overrides = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_folder(shape, Path(tmp) / "model")
        measured = measure(model_dir, overrides, Path(tmp), nproc)
        plan = predict(model_dir, overrides, nproc)
    predicted = sum(plan.train_peak.values())
    actual = measured[0]["peak_step_2"]
    profiler_low = min(m["profiler"]["peak_step_2"] for m in measured)
    return {"case": case, "shape": shape, "overrides": overrides, "parameters": plan.parameters,
            "micro_batches_per_rank": plan.micro_batches, "tokens_per_micro_batch": plan.tokens_per_micro_batch,
            "measured": measured, "predicted_peak_bytes": predicted, "predicted_by_category": plan.train_peak,
            "ratio_predicted_to_measured": predicted / actual,
            "ratio_predicted_to_profiler_lowest_rank": predicted / profiler_low, "within_tolerance": abs(predicted / actual - 1) <=
            TOLERANCE, "tolerance": TOLERANCE}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[4:], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small case, printed, not recorded")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the real run (1: no gloo threads)")
    args = parser.parse_args()
    row = compare("quick" if args.quick else "recorded", args.nproc)
    row["processes"] = args.nproc
    print(json.dumps(row, indent=2))
    if not args.quick:
        from bench.common import append_record, new_record, results_path

        record = new_record("plan_validation", "cpu", results=[row])
        print(f"appended to {append_record(record, results_path('plan_validation', 'cpu'))}")
    if not row["within_tolerance"]:
        raise SystemExit(f"the plan is off by {100 * (row['ratio_predicted_to_measured'] - 1):+.1f}% (limit "
                         f"{100 * TOLERANCE:.0f}%)")


if __name__ == "__main__":
    main()
