"""The memory plan of every shipped GPU config, as docs/gpus.md shows it (python -m fastmath.planner per config).

    .venv/bin/python bench/memory_plans.py            # plan each config with a '# GPUs:' header, append a record
    .venv/bin/python bench/memory_plans.py --table    # docs/gpus.md's table from the newest record

Each plan simulates one optimizer step per training stage on this CPU (fake tensors, a fake process group of the
header's world size; fastmath/planner.py), so the record's device is the CPU that simulated, and the figures are
per-GPU bytes of the GPU named in each config's header. Step times in the table are the planner's estimates from
FLOPs and bytes at data-sheet rates, not measurements. tests/test_planner.py re-plans every config in CI and holds
it to its header's GPU; a test keeps docs/gpus.md's table equal to this record's rendering.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import append_record, load_records, new_record, results_path  # noqa: E402

GiB = 2**30
SHORT = {"parameters": "params", "gathered parameters": "gathered", "gradients": "grads",
         "optimizer states": "optim", "activations": "activ.", "LM-head buffers": "LM head",
         "reference model": "ref", "vLLM engine": "vLLM"}


def gpu_configs() -> list[Path]:
    from fastmath.planner import header_gpus

    return [p for p in sorted((REPO / "configs").glob("*.yaml")) if header_gpus(str(p))]


def plan(config: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "fastmath.planner", "--json", "--config",
                           str(config.relative_to(REPO))], capture_output=True, text=True, cwd=REPO, timeout=1800)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"{config.name}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(record: dict) -> str:
    rows = ["| config | GPUs | stage | " + " | ".join(SHORT.values()) + " | peak GiB | fits (90%) | est. step (s) |",
            "|---" * (len(SHORT) + 6) + "|"]
    for p in record["results"]:
        gpus = f"{p['nodes']} x {p['gpus_per_node']} {p['gpu']}"
        for s in p["stages"]:
            cells = " | ".join(f"{s['by_category'].get(c, 0) / GiB:.1f}" for c in SHORT)
            times = ", ".join(f"{k} {v:.0f}" for k, v in s["estimated_seconds"].items())
            rows.append(f"| `{Path(p['config']).name}` | {gpus} | {s['stage']} | {cells} | {s['peak_bytes'] / GiB:.1f} "
                        f"| {'yes' if s['fits'] else 'NO'} | {times} |")
    return "\n".join(rows) + (f"\n\nPer-GPU GiB at each stage's peak (`python fastmath/train.py --config X --plan`), "
                             f"simulated on {record['device']} at commit {str(record['git_commit'])[:7]}; "
                             f"step times are estimates from FLOPs and bytes at data-sheet rates, not measurements.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    path = results_path("memory_plans", "cpu")
    if args.table:
        print(table(load_records(path)[-1]))
        return
    results = []
    for config in gpu_configs():
        print(f"planning {config.name} ...", flush=True)
        results.append(plan(config))
    record = new_record("memory_plans", "cpu", results=results)
    print(f"appended to {append_record(record, path)}")
    print(table(record))


if __name__ == "__main__":
    main()
