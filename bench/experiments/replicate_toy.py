"""The recipe's two findings at toy scale, on the embedded default, measured end to end on CPU (about 25-30 min).

Fast-Math-R1 reports (its main table: accuracy and mean output tokens per model and stage):
  1. longer SFT helps: more epochs on the same reasoning traces -> higher accuracy;
  2. GRPO after SFT keeps the accuracy while cutting the solution length, and RL alone (no SFT first) is the
     weaker route (the ablation).
This script runs the same experiment on fastmath's own synthetic problems and tiny model:
    sft_1ep, sft_3ep, sft_10ep   configs/demo.yaml's SFT stage for 1, 3 and 10 epochs (same data, same peak lr;
                                 each schedule's cosine spans its own length)
    sft_10ep+grpo                configs/demo.yaml's GRPO stage (format + cosine + Kimi length rewards) from the
                                 10-epoch export
    rl_only                      the same GRPO stage from the untrained model (the paper's ablation)
    untrained                    the initial model, for reference
and evaluates every model with the `eval` stage: pass@1 over k samples per held-out problem (temperature 1.0,
top_p 0.9, min_p 0.05, the seed's settings) at two token budgets, with its standard error, majority vote and
mean output tokens. Everything comes from the runs it makes; nothing is copied from earlier results.

Outputs: bench/results/replication-cpu.json (a bench record: per stage the eval metrics, run times, seeds and
commands), bench/results/replication-cpu.png (accuracy vs mean tokens, the paper's figure) and the markdown
table printed at the end (docs/results.md shows it).

    .venv/bin/python bench/experiments/replicate_toy.py                  # the full experiment (keeps its runs in runs/replication)
    .venv/bin/python bench/experiments/replicate_toy.py --seeds 0,1,2 --capability avx2   # per seed, mean (min-max) in the table
    .venv/bin/python bench/experiments/replicate_toy.py --quick          # a smoke run: tiny schedules, a few problems
    .venv/bin/python bench/experiments/replicate_toy.py --replot         # redraw the plot and table of the newest record
    .venv/bin/python bench/experiments/replicate_toy.py --part demo --seeds 0,1,2 --capability default
                                                             # make demo's own stages per seed (bench/experiments/toy_seeds.py)

`--capability avx2|default` sets ATEN_CPU_CAPABILITY in every stage (PyTorch's AVX2 or plain-C kernels: another
machine's fp32 summation order on this one); `native` leaves it unset. `--parallel 2` (or 3) runs that many
seeds at once with one thread each.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.experiments import toy_seeds  # noqa: E402
from bench.common import append_record, new_record, results_path  # noqa: E402

TRAIN = [sys.executable, str(REPO / "fastmath" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml")]


def one_seed(seed: int, work: Path, args, env: dict) -> list[dict]:
    """Every stage of the experiment for one seed; one row per evaluated model."""
    work.mkdir(parents=True, exist_ok=True)
    epochs = (1, 3, 10)
    # Eager vLLM: 8 engine starts of under a second instead of ~40 s each on CPU (the demo's GRPO sampled as fast
    # eagerly after its first step, which is ~3 s slower: configs/demo.yaml).
    # The replication's records are of the embedded data as built (half the SFT rows verbose), whatever the
    # demo's own data setting now is.
    common = [f"run.seed={seed}", "run.resume=never", "heldout.num_problems=0", "data.embedded_verbose_fraction=0.5",
              "grpo.rollout.vllm_enforce_eager=true", "eval.vllm_enforce_eager=true"]
    runs, seconds, commands = {}, {}, {}

    def stage(name: str, extra: list[str]) -> None:
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        cmd = [*TRAIN, f"run.output_dir={out}", *common, *extra]
        commands[name] = " ".join(cmd[1:]).replace(str(REPO) + "/", "")
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {name} ...", flush=True)
        seconds[name] = toy_seeds.run_logged(cmd, work / f"{name}.log", env)
        print(f"    {seconds[name] / 60:.1f} min", flush=True)

    for n in epochs:
        stage(f"sft_{n}ep", ["run.stages=[sft]", f"sft.epochs={1 if args.quick else n}",
                             *(["sft.max_steps=20"] if args.quick else [])])
        runs[f"sft_{n}ep"] = work / f"sft_{n}ep" / "hf"
    stage("sft_10ep+grpo", ["run.stages=[grpo]", f"grpo.init_from={work / 'sft_10ep' / 'hf'}",
                            f"grpo.max_steps={args.grpo_steps}"])
    runs["sft_10ep+grpo"] = work / "sft_10ep+grpo" / "grpo" / "hf"
    stage("rl_only", ["run.stages=[grpo]", "grpo.init_from=embedded", f"grpo.max_steps={args.grpo_steps}"])
    runs["rl_only"] = work / "rl_only" / "grpo" / "hf"
    runs = {"untrained": "embedded", **runs}

    rows = []
    for name, model in runs.items():
        stage(f"eval_{name}", ["run.stages=[eval]", f"eval.model={model}", f"eval.label={name}",
                               f"eval.samples={args.samples}", f"eval.max_problems={args.problems}",
                               f"eval.budgets=[{','.join(map(str, args.budget_list))}]", "eval.output=eval"])
        result = json.loads((work / f"eval_{name}" / "eval" / "results.json").read_text())
        rows.append({"seed": seed, "stage": name, "model": str(model).replace(str(REPO) + "/", ""),
                     "train_minutes": seconds[name] / 60 if name in seconds else None,
                     "eval_minutes": seconds[f"eval_{name}"] / 60, "command": commands.get(name),
                     "metrics": result["metrics"]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    toy_seeds.add_arguments(parser)
    parser.add_argument("--part", choices=("recipe", *sorted(toy_seeds.PARTS)), default="recipe",
                        help="recipe: the experiment above; demo / sft: make demo's stages per seed "
                             "(bench/experiments/toy_seeds.py)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "replication")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem (k) in the evaluation")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems evaluated")
    parser.add_argument("--budgets", default="64,160", help="token budgets of the evaluation")
    parser.add_argument("--grpo-steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch each, 3 GRPO steps, 16 problems")
    args = parser.parse_args()
    seeds = toy_seeds.parse_seeds(args.seeds)
    if args.part != "recipe":
        toy_seeds.run_part(seeds, args.capability, args.part, args.parallel, args.work, args.out, args.note,
                           args.threads)
        return
    if args.quick:
        args.problems, args.samples, args.grpo_steps = 16, 2, 3
    args.budget_list = [int(b) for b in args.budgets.split(",")]
    env = toy_seeds.child_env(args.capability, toy_seeds.child_threads(args.threads, args.parallel))
    record = new_record("replication", "cpu", seeds=seeds, capability=args.capability,
                        capability_used=toy_seeds.effective_capability(args.capability), parallel=args.parallel,
                        samples=args.samples, problems=args.problems, budgets=args.budget_list,
                        grpo_steps=args.grpo_steps, quick=args.quick, note=args.note or
                        "toy replication of Fast-Math-R1's findings on the embedded default; eval: pass@1 over k "
                        "samples (temperature 1.0, top_p 0.9, min_p 0.05) on held-out problems")
    started = time.perf_counter()
    work = args.work / args.capability
    with ThreadPoolExecutor(args.parallel) as pool:
        for rows in pool.map(lambda s: one_seed(s, work / f"seed{s}", args, env), seeds):
            record["results"].extend(rows)
    record["total_minutes"] = (time.perf_counter() - started) / 60
    path = append_record(record, results_path("replication", "cpu", args.out))
    print(format_table(record))
    plot(record, args.out / "replication-cpu.png")
    print(f"appended to {path}")


def stage_metrics(record: dict) -> dict:
    """{stage: {budget: [metrics of each seed]}} in the record's stage order."""
    out: dict = {}
    for row in record["results"]:
        by_budget = out.setdefault(row["stage"], {})
        for m in row["metrics"]:
            by_budget.setdefault(m["budget"], []).append(m)
    return out


def format_table(record: dict) -> str:
    budgets = record["budgets"]
    seeds = record.get("seeds", [record.get("seed")])
    head = "| stage | " + " | ".join(f"pass@1 @{b} | mean tokens @{b}" for b in budgets) + \
        f" | majority @{budgets[-1]} |"
    lines = [head, "|" + "---|" * (2 * len(budgets) + 2)]
    for stage, by in stage_metrics(record).items():
        cells = []
        for b in budgets:
            cells += [toy_seeds.mean_range([m["pass_at_1"] for m in by[b]], 100, unit="%"),
                      toy_seeds.mean_range([m["mean_tokens"] for m in by[b]])]
        lines.append(f"| {stage} | " + " | ".join(cells) +
                     f" | {toy_seeds.mean_range([m['majority'] for m in by[budgets[-1]]], 100, unit='%')} |")
    lines.append(f"\n{record['problems']} held-out problems x {record['samples']} samples (pass@1 over k samples, not "
                 f"greedy); mean (min-max) over seeds {seeds}; {record['device']}, ATEN_CPU_CAPABILITY "
                 f"{record.get('capability', 'native')}, {record['date'][:10]}, commit "
                 f"{str(record['git_commit'])[:7]}; whole script {record['total_minutes']:.0f} min.")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """pass@1 against mean tokens at the largest budget: each stage's mean, bars spanning the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = record["budgets"][-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (stage, by) in enumerate(stage_metrics(record).items()):
        xs = [m["mean_tokens"] for m in by[budget]]
        ys = [100 * m["pass_at_1"] for m in by[budget]]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        ax.errorbar(mx, my, xerr=[[mx - min(xs)], [max(xs) - mx]], yerr=[[my - min(ys)], [max(ys) - my]],
                    fmt="o", capsize=3)
        ax.annotate(stage, (mx, my), textcoords="offset points", xytext=(6, -12 if i % 2 else 5), fontsize=8)
    ax.set_xlabel(f"mean output tokens (budget {budget})")
    ax.set_ylabel("pass@1 over k samples (%)")
    ax.set_title(f"Toy replication, {record['device']}, {record['date'][:10]}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(path: Path) -> None:
    """Redraw the PNG and print the table of the newest record in `path` (no runs)."""
    import json

    record = json.loads(Path(path).read_text())[-1]
    print(format_table(record))
    plot(record, Path(path).with_suffix(".png"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:
        replot(Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / "bench" / "results" / "replication-cpu.json")
    else:
        main()
