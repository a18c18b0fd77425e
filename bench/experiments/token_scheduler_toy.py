"""The token scheduler at toy scale: at equal pass@1, how many output tokens do per-problem budgets save against
the best fixed budget?

    nice -n 10 .venv/bin/python bench/experiments/token_scheduler_toy.py --seeds 0,1,2      # ~6 min of CPU on 2 cores
    .venv/bin/python bench/experiments/token_scheduler_toy.py --table                        # the recorded runs

What runs, in order (every step is the project's own command):
    1. a policy: the demo's SFT stage, shortened (`configs/demo.yaml run.stages=[sft] sft.epochs=E`), once;
       or `--policy DIR`, an export already trained (a finished `make demo`'s runs/demo/grpo/hf: the policy the
       scheduler is meant for, one that solves the problems);
    2. its records: the eval stage on the embedded validation problems (k samples each at the largest budget),
       which writes token_records.jsonl;
    3. per seed s: `python -m fastmath.token_scheduler train` (the tiny ModernBERT, run.seed=s: its
       initialisation and held-out split), then the eval stage on the embedded test problems with run.seed=s
       (its own samples) and eval.token_scheduler set: one sampling gives every fixed budget's row and the
       scheduler's row, so the comparison is paired, sample for sample.
Per seed: the scheduler's pass@1 P and mean output tokens T; the best fixed budget is the one with the fewest
mean tokens among those whose pass@1 is at least P (equal or better accuracy); saved = 1 - T / its tokens
(negative: the scheduler spent more). The margin rule is the configured default, chosen before the run (no
tuning on the test problems). One record per invocation in bench/results/token_scheduler-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import append_record, load_records, new_record, results_path  # noqa: E402

BUDGETS = [16, 24, 32, 40, 48, 56, 64, 80, 160]


def best_fixed(fixed: list[dict], scheduled: dict) -> dict | None:
    """The fixed budget with the fewest mean tokens among those at least as accurate as the scheduler."""
    good = [m for m in fixed if m["pass_at_1"] >= scheduled["pass_at_1"]]
    return min(good, key=lambda m: m["mean_tokens"]) if good else None


def compare(results: dict) -> dict:
    """One seed's row: the scheduler's pass@1, tokens and mean budget against the best fixed budget's."""
    sched = results["scheduled"]
    fixed = results["metrics"]
    best = best_fixed(fixed, sched)
    largest = max(fixed, key=lambda m: m["budget"])
    row = {"sched_pass_at_1": sched["pass_at_1"], "sched_mean_tokens": sched["mean_tokens"],
           "sched_mean_budget": sched["mean_budget"], "sched_mean_predicted": sched["mean_predicted_tokens"],
           "largest_budget": largest["budget"], "largest_pass_at_1": largest["pass_at_1"],
           "largest_mean_tokens": largest["mean_tokens"],
           "fixed": [{k: m[k] for k in ("budget", "pass_at_1", "mean_tokens", "truncation_rate")} for m in fixed]}
    if best is not None:
        row.update(best_budget=best["budget"], best_pass_at_1=best["pass_at_1"], best_mean_tokens=best["mean_tokens"],
                   tokens_saved=1.0 - sched["mean_tokens"] / best["mean_tokens"])
    return row


def run(cmd: list[str], log: Path, threads: int | None = None) -> float:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - started


def train_py(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "fastmath" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
            *overrides]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sft-epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="samples per problem in both evals")
    parser.add_argument("--policy", type=Path, default=None,
                        help="an HF export to schedule for (e.g. a finished demo's runs/demo/grpo/hf) instead of "
                        "training the shortened SFT policy; --sft-epochs is then unused")
    parser.add_argument("--work", default="runs/token_scheduler_toy")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every step (the machine is "
                        "shared: one thread each does not fight the others for the two cores)")
    parser.add_argument("--table", action="store_true", help="print the recorded runs and exit")
    args = parser.parse_args()
    path = results_path("token_scheduler", "cpu")
    if args.table:
        for record in load_records(path):
            print(json.dumps(record["summary"], indent=1))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = ["run.resume=never", "heldout.num_problems=0", "eval.generator=vllm", "eval.vllm_enforce_eager=true",
              f"eval.samples={args.samples}", f"eval.budgets=[{','.join(map(str, BUDGETS))}]", "eval.answer_workers=1"]
    given = args.policy.resolve() if args.policy else None
    if given is not None and not (given / "config.json").is_file():
        sys.exit(f"--policy {given}: no config.json there (pass an HF export folder, e.g. runs/demo/grpo/hf)")
    record = new_record("token_scheduler", "cpu", sft_epochs=None if given else args.sft_epochs,
                        policy=str(given) if given else None, samples=args.samples, budgets=BUDGETS,
                        seeds=seeds, child_threads=args.threads, command=" ".join(sys.argv))
    times = {}
    policy = work / "policy"  # the evals' output folder; with --policy the model itself lives elsewhere
    model = given or policy / "hf"
    if given is None:
        times["sft_s"] = run(train_py(f"run.output_dir={policy}", "run.stages=[sft]", f"sft.epochs={args.sft_epochs}",
                                      *common), work / "sft.log", args.threads)
    times["records_s"] = run(train_py(f"run.output_dir={policy}", "run.stages=[eval]", f"eval.model={model}",
                                      "eval.benchmark_split=validation", "eval.output=records", *common),
                             work / "records.log", args.threads)
    for seed in seeds:
        sched = work / f"scheduler-{seed}"
        times[f"train_scheduler_{seed}_s"] = run(
            [sys.executable, "-m", "fastmath.token_scheduler", "train", "--records", str(policy / "records"),
             "--out", str(sched), f"run.seed={seed}"], work / f"scheduler-{seed}.log",
            args.threads)
        out = f"eval-{seed}"
        times[f"eval_{seed}_s"] = run(train_py(f"run.output_dir={policy}", "run.stages=[eval]", f"run.seed={seed}",
                                               f"eval.model={model}", "eval.benchmark_split=test",
                                               f"eval.output={out}", f"eval.token_scheduler={sched}", *common),
                                      work / f"{out}.log", args.threads)
        results = json.loads((policy / out / "results.json").read_text())
        report = json.loads((sched / "scheduler.json").read_text())["report"]
        record["results"].append({"seed": seed, **compare(results), "scheduler": report})
    record["times"] = times
    record["summary"] = summarize(record["results"])
    print(json.dumps(record["summary"], indent=1))
    append_record(record, path)
    print(f"appended to {path}")


def summarize(rows: list[dict]) -> dict:
    """Mean and range over seeds of the figures docs/gpus.md quotes."""
    def spread(key):
        values = [r[key] for r in rows if key in r]
        if not values:
            return None
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}

    return {key: spread(key) for key in ("sched_pass_at_1", "sched_mean_tokens", "sched_mean_budget",
                                         "best_pass_at_1", "best_mean_tokens", "tokens_saved",
                                         "largest_pass_at_1", "largest_mean_tokens")} | {
        "best_budgets": [r.get("best_budget") for r in rows]}


if __name__ == "__main__":
    main()
