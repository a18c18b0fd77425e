"""One GRPO-trade-off setting of the demo, measured over seeds: the levers issue 16 asks to report, tried or not.

Every run is the demo's own command (`bench/experiments/toy_seeds.py`: `train.py --config configs/demo.yaml run.seed=S`,
SFT then GRPO, a fresh output folder) with the setting's overrides appended. One record per invocation in
bench/results/toy_levers-cpu.json: the setting, and per seed the same row toy_seeds writes (greedy held-out
accuracy and mean completion tokens after SFT and after GRPO, the token cut, the stage times).

Settings:
  --set KEY=VALUE            a config override (repeatable), e.g. --set grpo.lr=1e-4 --set grpo.max_steps=80
  --verbose-fraction F       SFT on the embedded problems with F of the train rows carrying the verbose
                             solution (the embedded data has 0.5). The problems, the tokenizer, the model, the
                             validation rows and the held-out test rows are the embedded ones; only which
                             train rows show the re-checks changes, so GRPO has more (or less) length to remove.
                             The seed's SFT data are long R1 traces throughout, so a larger F is closer to it.

    .venv/bin/python bench/experiments/toy_levers.py --verbose-fraction 0.8 --seeds 0,1,2 --parallel 3
    .venv/bin/python bench/experiments/toy_levers.py --verbose-fraction 0.8 --set sft.epochs=15 --capability avx2
        # a longer SFT (a --set that changes SFT runs both stages; --sft-from is for GRPO-only settings)
    .venv/bin/python bench/experiments/toy_levers.py --verbose-fraction 0.8 --set grpo.lr=3e-5 \
        --sft-from runs/toy_levers/verbose0.8-native       # GRPO only, from that setting's SFT exports
    .venv/bin/python bench/experiments/toy_levers.py --table      # every recorded setting, one line each
    .venv/bin/python bench/experiments/toy_levers.py --verbose-fraction 0.8 --seeds 0,1,2 --collect
        # the record from finished runs already in --work (when the script itself stopped after them); their
        # times then start at each run's config.json, so the ~10 s of process start before it are not counted
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.experiments import toy_seeds  # noqa: E402
from bench.common import append_record, load_records, new_record, results_path  # noqa: E402
from fastmath.config import with_current_keys  # noqa: E402


BASE = ["sft.epochs=10", "data.embedded_verbose_fraction=0.5"]


def verbose_data(work: Path, fraction: float, cache_dir: Path | None = None) -> list[str]:
    """Write the embedded train split with `fraction` verbose rows; the overrides that point SFT at it."""
    from fastmath.embedded import ensure_embedded_assets
    from fastmath.synthetic import make_splits, write_jsonl

    # The embedded data are make_splits(seed=0) (fastmath/embedded.py); checked here so a change there cannot
    # make this setting train on other problems than the demo's.
    embedded = (ensure_embedded_assets(cache_dir).data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    train = make_splits(seed=0, verbose_fraction=fraction)["train"]
    if len(train) != len(embedded) or any(f'"uid": "{row["uid"]}"' not in line for row, line in zip(train, embedded)):
        raise SystemExit("make_splits(seed=0) no longer gives the embedded train problems; update verbose_data")
    path = verbose_path(work, fraction)
    write_jsonl(train, path)
    return [f"data.train={path}"]


def verbose_path(work: Path, fraction: float) -> Path:
    return work / f"train-verbose{fraction:g}.jsonl"


def parse_sets(items: list[str]) -> list[str]:
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
    return list(items)


def refuse_sft_settings_in_grpo_only(sets: list[str], sft_from) -> None:
    """A GRPO-only run (--sft-from) starts from finished SFT models: an sft.* setting would change nothing and
    still name the record, so it is refused."""
    sft_keys = [item.split("=", 1)[0].strip() for item in sets if item.strip().startswith("sft.")]
    if sft_from and sft_keys:
        raise SystemExit(f"--sft-from runs GRPO only, so {', '.join(sft_keys)} would have no effect; "
                         "drop --sft-from to train SFT with it")


def setting_name(record: dict) -> str:
    """The setting as today's config keys say it (a record keeps the overrides it ran with: grpo.beta before the
    grpo section split is grpo.loss.beta now)."""
    parts = [with_current_keys(item) for item in record["overrides"]]
    if record.get("verbose_fraction") is not None:
        parts.insert(0, f"SFT data {100 * record['verbose_fraction']:.0f}% verbose")
    if record.get("sft_from"):
        parts.append("GRPO only, from that setting's SFT models")
    return ", ".join(parts) or "the demo's"


def host_name(record: dict) -> str:
    """The CPU's name with its family and model where recorded: two hosts may share a name (both "AMD EPYC")
    and differ in arithmetic (AVX2 only vs AVX-512)."""
    name = record["device"].removeprefix("CPU: ")
    cpu = record.get("cpu") or {}
    return f"{name} family {cpu['family']} model {cpu['model']}" if cpu.get("family") else name


def markdown(records: list[dict]) -> str:
    """One line per recorded setting: mean (min-max) over its seeds, as docs/results.md's GRPO trade-off table."""
    lines = ["| setting | seeds | host | ATEN_CPU_CAPABILITY (used) | after SFT: greedy accuracy | mean tokens "
             "| after GRPO: greedy accuracy | mean tokens | token cut | accuracy change (points) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        rows = rec["results"]
        lines.append(f"| {setting_name(rec)} | {','.join(str(r['seed']) for r in rows)} | {host_name(rec)} | "
                     f"{rec['capability']} "
                     f"({rec['capability_used']}) | {toy_seeds.seed_cell(rows, 'sft_accuracy', 100, unit='%')} | "
                     f"{toy_seeds.seed_cell(rows, 'sft_tokens')} | " + " | ".join(toy_seeds.grpo_cells(rows))
                     + f" | {str(rec['git_commit'])[:7]} |")
    if records:
        lines.append("\nEvery record of `bench/results/toy_levers-cpu.json`; host: the CPU's name, family and model; "
                     "held-out: the demo's 200 test problems, greedy decoding; mean (min-max) over the seeds; the "
                     "demo's GRPO (lr 5e-5, 40 steps, rewards format + cosine + Kimi length) where no setting says "
                     "otherwise.")
    return "\n".join(lines)


def grpo_only(seed: int, work: Path, sft_work: Path, capability: str, threads: int | None,
              extra: tuple[str, ...]) -> dict:
    """The demo's GRPO stage alone from an earlier setting's SFT export of the same seed; its record row."""
    sft_out = sft_work / f"seed{seed}"
    if not (sft_out / "hf").is_dir() or not (sft_out / "summary.json").is_file():
        raise SystemExit(f"{sft_out} holds no finished SFT stage (hf/ and summary.json)")
    return toy_seeds.run_seed(seed, work, "demo", capability, threads,
                              (*extra, "run.stages=[grpo]", f"grpo.init_from={sft_out / 'hf'}"), sft_out)


def collected_row(seed: int, work: Path, extra: tuple[str, ...]) -> dict:
    """The row of a finished run in `work`, timed from its config.json (written as its SFT stage starts)."""
    out = work / f"seed{seed}"
    if not (out / "grpo" / "summary.json").is_file():
        raise SystemExit(f"{out} holds no finished run (no grpo/summary.json); run the setting first")
    config_written = (out / "config.json").stat().st_mtime
    seconds = (out / "grpo" / "summary.json").stat().st_mtime - config_written
    command = toy_seeds.command_text(toy_seeds.demo_command(seed, out, "demo", extra))
    return toy_seeds.seed_row(seed, out, "demo", command, seconds, config_written)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    toy_seeds.add_arguments(parser)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override of the setting (repeatable)")
    parser.add_argument("--verbose-fraction", type=float, default=None,
                        help="share of SFT train rows with the verbose solution (embedded data: 0.5)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "toy_levers")
    parser.add_argument("--table", action="store_true", help="print every recorded setting; runs nothing")
    parser.add_argument("--sft-from", type=Path, default=None,
                        help="run GRPO only, from the SFT exports (seedS/hf) of an earlier setting's --work folder")
    parser.add_argument("--collect", action="store_true",
                        help="build the record from the finished runs in --work instead of running them")
    args = parser.parse_args()
    path = results_path("toy_levers", "cpu", args.out)
    if args.table:
        print(markdown(load_records(path)))
        return
    if args.verbose_fraction is not None and not 0.0 <= args.verbose_fraction <= 1.0:
        raise SystemExit(f"--verbose-fraction must be in [0, 1], got {args.verbose_fraction}")
    seeds, sets = toy_seeds.parse_seeds(args.seeds), parse_sets(args.sets)
    toy_seeds.refuse_grpo_without_vectors(args.capability, "demo", tuple(sets))  # every setting ends with GRPO
    refuse_sft_settings_in_grpo_only(sets, args.sft_from)
    if args.collect and args.sft_from:
        raise SystemExit("--collect reads whole runs; it does not combine with --sft-from")
    name = "_".join([f"verbose{args.verbose_fraction:g}"] * (args.verbose_fraction is not None)
                    + [s.replace("=", "-") for s in sets]) or "demo"
    name += "_grpo-only" if args.sft_from else ""
    work = args.work / f"{name}-{args.capability}"
    work.mkdir(parents=True, exist_ok=True)
    threads = toy_seeds.child_threads(args.threads, args.parallel)
    record = new_record("toy_levers", "cpu", overrides=sets, verbose_fraction=args.verbose_fraction,
                        part="demo", capability=args.capability,
                        capability_used=toy_seeds.effective_capability(args.capability), seeds=seeds,
                        parallel=args.parallel, child_threads=threads or "torch default", note=args.note,
                        collected=args.collect, sft_from=str(args.sft_from) if args.sft_from else None)
    data = [] if args.verbose_fraction is None else (
        [f"data.train={verbose_path(work, args.verbose_fraction)}"] if args.collect
        else verbose_data(work, args.verbose_fraction))
    # Every setting here is a change to the demo as it was when these records began (the embedded data as built,
    # half the SFT rows verbose, 10 SFT epochs); the demo has since adopted one of them, so that base is pinned.
    extra = tuple(BASE + sets + data)
    if args.collect:
        rows = [collected_row(seed, work, extra) for seed in seeds]
        record["wall_minutes"] = None
    else:
        started = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            if args.sft_from:
                rows = list(pool.map(lambda s: grpo_only(s, work, args.sft_from, args.capability, threads, extra),
                                     seeds))
            else:
                rows = list(pool.map(lambda s: toy_seeds.run_seed(s, work, "demo", args.capability, threads, extra),
                                     seeds))
        record["wall_minutes"] = (time.perf_counter() - started) / 60
    record["results"] = rows
    record["summary"] = toy_seeds.spread(rows)
    print(markdown([record]))
    append_record(record, path)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
