"""`make demo` end to end, timed on an idle machine: the record behind docs/results.md's run-time figure.

Runs the demo's own command (`torchrun --standalone --nproc_per_node=1 fastmath/train.py --config
configs/demo.yaml`, seed 0, a fresh output folder, torch's own thread count, the machine's own CPU arithmetic)
once, and appends to bench/results/demo_time-cpu.json: the wall time, where it went (start -> SFT summary,
SFT summary -> GRPO summary), the outcome figures, and how idle the machine was: the load average before and
after, and the share of CPU time the hypervisor took (steal, from /proc/stat), since both slow a 2-core run
without showing in its own figures.

    .venv/bin/python bench/experiments/demo_time.py            # refuses to start when the 1-minute load average is >= 0.5
    .venv/bin/python bench/experiments/demo_time.py --force    # time it anyway; the record keeps the load it saw

The embedded data and model are built once per seed and cached (~/.cache/fastmath); the first `make demo` on a
machine also builds them (seconds), and `make install` builds the venv (minutes): neither is counted here.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import append_record, loadavg, new_record, results_path  # noqa: E402
from bench.experiments.toy_seeds import RESULTS, effective_capability, run_seed  # noqa: E402

IDLE_LOAD = 0.5


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ... (ticks)."""
    with open("/proc/stat") as handle:
        return [int(x) for x in handle.readline().split()[1:]]


def steal_share(before: list[int], after: list[int]) -> float:
    """Fraction of all CPU ticks between the two readings that the hypervisor stole (field 8)."""
    delta = [b - a for a, b in zip(before, after)]
    return delta[7] / max(1, sum(delta[:8]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="run even when the machine is not idle")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    if load >= IDLE_LOAD and not args.force:
        raise SystemExit(f"the 1-minute load average is {load:.2f} (>= {IDLE_LOAD}): this machine is not idle, so "
                         "the time would not be the demo's; wait, or pass --force to record it with that load")
    record = new_record("demo_time", "cpu", seed=args.seed, capability_used=effective_capability("native"),
                        note=args.note)
    ticks = cpu_times()
    with tempfile.TemporaryDirectory(prefix="demo_time-") as work:
        row = run_seed(args.seed, Path(work), "demo", "native", None)
    row["steal_share"] = steal_share(ticks, cpu_times())
    row["loadavg_end"] = loadavg()
    record["results"] = [row]
    path = append_record(record, results_path("demo_time", "cpu", args.out))
    print(f"make demo: {row['seconds'] / 60:.1f} min end to end (SFT part {row['sft_stage_seconds'] / 60:.1f}, "
          f"GRPO part {row['grpo_stage_seconds'] / 60:.1f}); steal {100 * row['steal_share']:.1f}%; "
          f"appended to {path}")


if __name__ == "__main__":
    main()
