"""Every CPU comparison in one command: results appended to bench/results/, PNGs redrawn, docs/performance.md regenerated.

    .venv/bin/python bench/run_all.py                 # about 4 minutes on 2 idle cores
    .venv/bin/python bench/run_all.py --only sft_e2e  # one stage (then plots and docs/performance.md as usual)
    .venv/bin/python bench/run_all.py --threads 2     # torch threads in every benchmark (default 1, see below)

Stages, in order, each a separate process with its output streamed:
    floor          bench/common.py: this machine's matmul rate and copy bandwidth (floor-cpu.json)
    cross_entropy  bench/bench_cross_entropy.py --sizes cpu: time and extra memory, eager torch vs fastmath
    attention      bench/bench_attention.py: the PyTorch reference vs SDPA on padded documents (tiny dry run)
    sft_e2e        bench/bench_sft_e2e.py: one SFT step of the demo config, our loop vs HF's attention+loss vs
                   TRL SFTTrainer: tokens/s and peak RSS
    grpo           bench/bench_grpo.py: the fused LM head + GRPO loss vs TRL's eager loss, compile, Liger
    grpo_e2e       bench/bench_grpo_e2e.py: one GRPO step end to end, fastmath (vLLM / HF rollouts) vs TRL GRPOTrainer
then bench/plot.py (every PNG) and bench/readme_performance.py --write (docs/performance.md's Performance section).

Threads: one per benchmark by default (OMP_NUM_THREADS=1), because on a machine whose cores are shared an
OpenMP team that spins while another process holds a core distorts timings many times over; every record
says its thread count and load average. On an idle machine, --threads 2 uses both cores.
A stage that fails is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def stages(python: str) -> dict[str, list[str]]:
    found = {
        "floor": [python, str(BENCH / "common.py")],
        "cross_entropy": [python, str(BENCH / "bench_cross_entropy.py"), "--sizes", "cpu", "--no-plot"],
        "attention": [python, str(BENCH / "bench_attention.py")],
        "sft_e2e": [python, str(BENCH / "bench_sft_e2e.py"), "--preset", "cpu"],
    }
    if (BENCH / "bench_grpo.py").exists():
        found["grpo"] = [python, str(BENCH / "bench_grpo.py"), "--no-plot"]
    found["grpo_e2e"] = [python, str(BENCH / "bench_grpo_e2e.py")]
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per benchmark (default 1)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/performance.md's Performance section")
    args = parser.parse_args()

    available = stages(sys.executable)
    chosen = args.only.split(",") if args.only else list(available)
    unknown = [s for s in chosen + [s for s in args.skip.split(",") if s] if s not in available]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {list(available)}")
    chosen = [s for s in chosen if s not in args.skip.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("TRITON_INTERPRET", None)  # CPU paths here are the PyTorch references, never the interpreter

    outcome = []
    started = time.perf_counter()
    for name in chosen:
        print(f"\n=== {name}: {' '.join(Path(a).name if a.endswith('.py') else a for a in available[name][1:])}",
              flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(available[name], cwd=REPO, env=env).returncode
        outcome.append((name, code, time.perf_counter() - t0))
    for name, command in (("plot", [sys.executable, str(BENCH / "plot.py")]),
                          ("readme", [sys.executable, str(BENCH / "readme_performance.py"), "--write"])):
        if name == "readme" and args.no_readme:
            continue
        print(f"\n=== {name}", flush=True)
        t0 = time.perf_counter()
        outcome.append((name, subprocess.run(command, cwd=REPO, env=env).returncode, time.perf_counter() - t0))

    print("\n| stage | status | seconds |\n|---|---|---|")
    for name, code, seconds in outcome:
        print(f"| {name} | {'ok' if code == 0 else f'FAILED (exit {code})'} | {seconds:.0f} |")
    print(f"total {time.perf_counter() - started:.0f} s, threads {args.threads}, load average now "
          f"{[round(x, 2) for x in os.getloadavg()]}")
    sys.exit(1 if any(code for _, code, _ in outcome) else 0)


if __name__ == "__main__":
    main()
