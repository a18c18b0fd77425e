"""What every benchmark shares: what ran where, timing, the floor, memory, and the results files.

A benchmark run is one *record* (a dict) appended to `bench/results/<benchmark>-<device>.json`, a JSON list
that keeps the history (`<device>` is `cpu` on any CPU, else the GPU's name in lower case, e.g.
`nvidia-h200`). `new_record` fills the keys every record has:

    benchmark   the benchmark's name ("cross_entropy", "varlen_attention", "sft_e2e", "floor", ...)
    date        UTC, ISO 8601, seconds
    device      "NVIDIA H200", or "CPU: <model name>"
    versions    python, torch, cuda, and the packages that matter (None where not installed)
    git_commit  HEAD, read from .git without running git (None outside a checkout)
    threads     torch's intra-op CPU threads
    cpu_count   logical CPUs of the host
    loadavg     {"start": [1, 5, 15 min], "end": [...]}: os.getloadavg() when the run began and ended; a CPU
                figure taken while the load average exceeds the free cores is noisy, and says so here
    results     a list of rows, one per (shape or config, provider); a row that could not run carries "error"
Timings inside rows are {"min", "median", "max", "n"} (`summarize`), in the unit their key names.

The floor (`measure_floor`): the time no implementation can beat on this device, from two rates measured in
the same run (random data, never zeros; warm-up excluded):
    matmul   an n x n x n product in the benchmark's dtype: 2 n^3 FLOPs over the median time
             (CUDA: n = 8192 in bf16; CPU: n = 1024 in fp32)
    copy     a device-to-device copy of a buffer: 2 x its bytes (read + write) over the median time
             (CUDA: 2 GiB; CPU: 256 MiB)
    floor_ms(flops, bytes) = max(flops / matmul rate, bytes / copy bandwidth), as in the Triton tutorials.

    python bench/common.py            # measure and print this machine's floor; append it to bench/results/floor-*.json
    python bench/common.py --quick    # small sizes, printed only (the GPU suite's dry run)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import resource
import signal
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PACKAGES = ("triton", "transformers", "liger-kernel", "trl", "flash-attn", "datasets", "accelerate")
REQUIRED_KEYS = ("benchmark", "date", "device", "versions", "git_commit", "threads", "cpu_count", "loadavg",
                 "results")


# ----------------------------------------------------------------------------------------------------
# What ran where
# ----------------------------------------------------------------------------------------------------


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device; "CPU: <model name>" otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def cpu_identity() -> dict:
    """What tells two CPUs of one marketing name apart: /proc/cpuinfo's family, model, stepping, clock, cache.

    Cloud hosts report every AMD EPYC as "AMD EPYC"; the same make demo took 16.8 min on one such host and
    10.7 on another (bench/results/demo_time-cpu.json), so the records keep these fields. {} off Linux.
    """
    wanted = {"cpu family": "family", "model": "model", "stepping": "stepping", "cpu MHz": "mhz",
              "cache size": "cache", "bogomips": "bogomips"}
    found = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in wanted and wanted[key.strip()] not in found:
                found[wanted[key.strip()]] = value.strip()
            if not line.strip() and found:
                break  # the first processor's block is enough
    except OSError:
        pass
    return found


def device_slug(name: str) -> str:
    """The device part of a results file name: "cpu" for every CPU, else the lower-cased name."""
    if name.startswith("CPU"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def git_commit() -> str | None:
    """HEAD's commit read from .git directly (no git process), or None outside a checkout."""
    git = REPO / ".git"
    try:
        common = git
        if git.is_file():  # a linked worktree: .git names its own folder, whose commondir holds the refs
            git = (REPO / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
            common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() \
                else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        for folder in (git, common):
            if (folder / ref).exists():
                return (folder / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def new_record(benchmark: str, device: torch.device | str | None = None, **fields) -> dict:
    """A record with the keys every run carries (see the module docstring), then `fields`, then results=[]."""
    record = {
        "benchmark": benchmark, "date": utc_now(), "device": device_name(device), "versions": versions(),
        "git_commit": git_commit(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg": {"start": loadavg(), "end": None},
    }
    if record["device"].startswith("CPU"):
        record["cpu"] = cpu_identity()
    record.update(fields)
    record.setdefault("results", [])
    return record


def check_record(record: dict) -> list[str]:
    """What is missing or malformed in a record (an empty list for a good one)."""
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in record]
    if not isinstance(record.get("results", []), list):
        problems.append("results is not a list")
    load = record.get("loadavg")
    if not (isinstance(load, dict) and len(load.get("start") or []) == 3):
        problems.append("loadavg has no start triple")
    for i, row in enumerate(record.get("results") or []):
        for key, value in row.items():
            if isinstance(value, dict) and "median" in value and not {"min", "max"} <= value.keys():
                problems.append(f"results[{i}].{key}: a timing without min/max")
    return problems


def results_path(benchmark: str, device: str, results_dir: Path = RESULTS) -> Path:
    return Path(results_dir) / f"{benchmark}-{device_slug(device)}.json"


def load_records(path: Path) -> list[dict]:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else []


def append_record(record: dict, path: Path) -> Path:
    """Stamp the closing load average and append the record to the JSON list at `path`."""
    if record.get("loadavg", {}).get("end") is None:
        record.setdefault("loadavg", {"start": None})["end"] = loadavg()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = load_records(path)
    runs.append(record)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return path


def exit_on_sigterm() -> None:
    """Turn SIGTERM (what `timeout` sends) into SystemExit, so `finally:` blocks save partial results."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def measure_and_append(record: dict, path: Path, cases: list, measure, case_of, what: str = "shapes") -> Path | None:
    """The loop of a per-shape benchmark: `measure(case)` returns result rows, added to record["results"] case by
    case. However the loop ends (done, SIGTERM, Ctrl-C, an error), what was measured is appended to `path`; a
    run that stopped early says after how many cases (`case_of(row)`: the case a result row belongs to).
    Returns the path, or None when nothing was measured."""
    exit_on_sigterm()
    try:
        for case in cases:
            record["results"] += measure(case)
            gc.collect()
    finally:
        done = len({case_of(row) for row in record["results"]})
        if done < len(cases):
            record["interrupted"] = f"stopped after {done} of {len(cases)} {what}"
        if record["results"]:
            append_record(record, path)
            print(f"appended to {path}")
    return path if record["results"] else None


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict:
    """{"min", "median", "max", "n"} of a non-empty list (the median of an even count is the mean of the middle two)."""
    if not values:
        raise ValueError("summarize needs at least one value")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device | str, reps: int = 5, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `reps` calls of fn() after `warmup` untimed calls.

    CUDA: CUDA events around each call (the device's time, launch queue included); CPU: perf_counter.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return times


# ----------------------------------------------------------------------------------------------------
# The floor: measured matmul rate and copy bandwidth
# ----------------------------------------------------------------------------------------------------


def matmul_rate(device: torch.device | str, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> dict:
    """TFLOP/s of an n x n x n product on random data (2 n^3 FLOPs over the median time)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    times = time_ms(lambda: a @ b, device, reps=reps, warmup=2)
    timing = summarize(times)
    return {"shape": [n, n, n], "dtype": str(dtype).removeprefix("torch."), "time_ms": timing,
            "tflops": 2 * n**3 / (timing["median"] * 1e-3) / 1e12}


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, reps: int = 10) -> dict:
    """GB/s of dst.copy_(src) counting bytes read plus bytes written, at the median time."""
    device = torch.device(device)
    nbytes = nbytes or (2 * 2**30 if device.type == "cuda" else 256 * 2**20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device, reps=reps, warmup=2)
    timing = summarize(times)
    return {"bytes": nbytes, "time_ms": timing, "gbps": 2 * nbytes / (timing["median"] * 1e-3) / 1e9}


def measure_floor(device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
    """{"matmul": matmul_rate, "copy": copy_bandwidth}; dtype defaults to bf16 on CUDA, fp32 on CPU."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    floor = {"matmul": matmul_rate(device, dtype), "copy": copy_bandwidth(device)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return floor


def floor_ms(flops: float, nbytes: float, floor: dict) -> float:
    """The least time work of `flops` FLOPs and `nbytes` bytes can take at the measured rates."""
    return 1e3 * max(flops / (floor["matmul"]["tflops"] * 1e12), nbytes / (floor["copy"]["gbps"] * 1e9))


def mfu(flops: float, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over a peak FLOP/s; None when the peak is unknown."""
    if not peak_flops or seconds <= 0:
        return None
    return flops / seconds / peak_flops


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------


class PeakStorageBytes(TorchDispatchMode):
    """CPU peak memory of tensors: bytes of the storages created by ops while active, tracked until freed.

    Storages that existed before (the inputs) are passed in and never counted; PyTorch keeps one Python
    object per live storage, so a finalizer on it fires exactly when the memory is released.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in existing}
        self.live = self.peak = 0

    def _freed(self, key, nbytes):
        self.known.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(storage := t.untyped_storage()) not in self.known:
                key, nbytes = id(storage), storage.nbytes()
                self.known.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, nbytes)
        return out


def peak_bytes(step, device: torch.device, inputs) -> int:
    """Peak bytes allocated by one call of `step` (a forward+backward) beyond the tensors `inputs`, the
    gradients included (their old gradients are dropped first). CUDA: the caching allocator's peak; CPU:
    PeakStorageBytes."""
    inputs = list(inputs)
    for t in inputs:
        t.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakStorageBytes(inputs) as tracker:
        step()
    return tracker.peak


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (a high-water mark: it never goes down)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


# ----------------------------------------------------------------------------------------------------
# CLI: measure the floor of this machine
# ----------------------------------------------------------------------------------------------------


def format_linear_row(r: dict) -> str:
    """One result row of the fused LM-head benchmarks (cross-entropy, GRPO) for the console."""
    t = r["time_ms"]
    return (
        f"N={r['N']:>6} d={r['d']:>5} V={r['V']:>6} {r['provider']:>9}: {t['median']:9.2f} ms "
        f"[{t['min']:.2f}, {t['max']:.2f}]  {r['tflops']:6.3f} TFLOP/s  {r['x_floor']:5.2f}x floor  "
        f"peak {r['peak_mib']:9.1f} MiB  extra {r['extra_mib']:9.1f} MiB "
        f"({100 * r['extra_vs_full_logits']:.1f}% of full logits {r['full_logits_mib']:.0f} MiB)"
    )


def format_floor(floor: dict) -> str:
    m, c = floor["matmul"], floor["copy"]
    return (f"matmul {m['shape'][0]}^3 {m['dtype']}: {m['tflops']:.2f} TFLOP/s (median of {m['time_ms']['n']}); "
            f"copy {c['bytes'] / 2**20:.0f} MiB: {c['gbps']:.1f} GB/s (read + write)")


def main():
    parser = argparse.ArgumentParser(description="Measure this machine's matmul rate and copy bandwidth (the floor).")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--quick", action="store_true", help="small sizes (256^3, 16 MiB), printed only: a check "
                        "that the measurement runs, not a figure to keep")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    record = new_record("floor", device)
    print(f"{record['device']} | torch {torch.__version__} | commit {record['git_commit']}", flush=True)
    if args.quick:
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        floor = {"matmul": matmul_rate(device, dtype, n=256, reps=3), "copy": copy_bandwidth(device, 16 * 2**20, 3)}
        print(format_floor(floor) + " (--quick: not saved)")
        return
    floor = measure_floor(device, dtype)
    record["results"] = [floor]
    print(format_floor(floor), flush=True)
    if not args.no_save:
        print(f"appended to {append_record(record, results_path('floor', record['device'], args.out))}")


if __name__ == "__main__":
    main()
