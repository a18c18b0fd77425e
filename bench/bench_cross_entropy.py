"""Benchmark: linear layer + cross-entropy, forward+backward time and peak memory, per provider.

Providers (the loss is the mean cross-entropy of hidden @ weight.T against labels; gradients for hidden and
weight):
    torch     eager PyTorch, HF style: F.cross_entropy((hidden @ weight.T).float(), labels): full logits
    compile   torch.compile of the same function (first call, the compile, excluded from timings)
    liger     Liger-Kernel's LigerFusedLinearCrossEntropyLoss (skipped when liger_kernel is missing)
    fastmath  kernels.fused_linear_cross_entropy (Triton on CUDA; the chunked PyTorch path on CPU)
    fastmath@<M>MiB  the same with chunk_bytes = M MiB of logits per chunk instead of the default 512 MiB
              (--chunk-mib M[,M...]): fewer chunks, fewer passes over the fp32 d weight accumulator, more memory
              (kernels/chunking.py); what a larger model.lm_head_chunk_mib would buy

What is measured (mode "full" = forward + backward, the only mode that matters for training):
    time      CUDA: triton.testing.do_bench (min / median / max over its repetitions); CPU: perf_counter
              over --reps runs after one warm-up run.
    TFLOP/s   6 * N * d * V / time (logits, d hidden, d weight; elementwise work not counted).
    floor     6 * N * d * V / the measured rate of one [4096, d] x [d, V] matmul in the same dtype: the time
              of the three matmuls alone. x_floor = time / floor (the issue's target on an H100: <= 1.3).
    memory    peak bytes allocated during one forward+backward beyond the inputs (CUDA: the caching
              allocator's peak; CPU: a TorchDispatchMode that adds each new storage's bytes when an op
              creates it and subtracts them when it is freed). extra = peak - the gradients' own bytes,
              compared with the full logits' N * V * itemsize (the issue's target: extra < 5% of that).

Presets (--sizes): "gpu" is the issue's grid, N in {4k, 16k, 32k} x d in {2048, 4096, 5120} x V in {32000,
128256, 151936}, bf16 (long: torch.compile recompiles per shape); "gpu-quick" is N = 16k, d = 4096,
V in {32000, 151936}; "cpu" runs the memory comparison at reduced sizes (fp32, torch vs fastmath).
Default: "gpu" on a CUDA machine, "cpu" otherwise.

Results are appended to bench/results/cross_entropy-<device>.json (a list of runs, each with the device
name, versions, git commit, date, shapes and min / median / max), and plotted to the .png beside it.

    python bench/bench_cross_entropy.py                                  # the preset for this machine
    python bench/bench_cross_entropy.py --sizes gpu-quick --providers liger,fastmath
    python bench/bench_cross_entropy.py --sizes 8192x4096x151936 --dtype bf16
    python bench/bench_cross_entropy.py --sizes gpu-quick --providers fastmath --chunk-mib 1024,2048,4096
"""

import argparse
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import common  # noqa: E402
from common import peak_bytes  # noqa: E402
from kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402

PRESETS = {
    "gpu": list(itertools.product([4096, 16384, 32768], [2048, 4096, 5120], [32000, 128256, 151936])),
    "gpu-quick": [(16384, 4096, 32000), (16384, 4096, 151936)],
    "cpu": [(1024, 256, 32000), (2048, 256, 151936)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("torch", "compile", "liger", "fastmath")


# ----------------------------------------------------------------------------------------------------
# Providers: each maps (hidden, weight, labels) -> scalar loss
# ----------------------------------------------------------------------------------------------------


def eager_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)


def make_provider(name):
    """The loss function of a provider, or a string saying why it cannot run here."""
    if name == "torch":
        return eager_loss
    if name == "compile":
        return torch.compile(eager_loss)
    if name == "fastmath":
        return fused_linear_cross_entropy
    if name == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError as err:
            return f"liger_kernel not importable: {err}"
        module = LigerFusedLinearCrossEntropyLoss()
        return lambda hidden, weight, labels: module(weight, hidden, labels)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


def make_inputs(n, d, v, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, d, generator=gen, device=device) / d**0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, device=device) / d**0.25).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    return hidden, weight, labels


def full_step(loss_fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss_fn(hidden, weight, labels).backward()


def time_ms(step, device, reps):
    """(min, median, max) milliseconds of one forward+backward."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(step, quantiles=[0.0, 0.5, 1.0]))
    step()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return min(times), statistics.median(times), max(times)


def matmul_tflops(d, v, dtype, device, reps):
    """Measured rate of the chunk-shaped matmul [4096, d] x [d, V] that dominates every provider."""
    a, b = torch.randn(4096, d, device=device).to(dtype), torch.randn(d, v, device=device).to(dtype)
    low, median, high = time_ms(lambda: a @ b, device, reps)
    return 2 * 4096 * d * v / (median * 1e-3) / 1e12


def bench_shape(n, d, v, dtype, device, providers, reps):
    """One result row per provider at one shape; failures (e.g. out of memory) are recorded, not raised."""
    hidden, weight, labels = make_inputs(n, d, v, dtype, device)
    flops = 6 * n * d * v
    floor_ms = flops / (matmul_tflops(d, v, dtype, device, reps) * 1e12) * 1e3
    grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    full_logits_bytes = n * v * hidden.element_size()
    rows = []
    for name, loss_fn in providers.items():
        row = dict(N=n, d=d, V=v, provider=name, floor_ms=floor_ms, full_logits_mib=full_logits_bytes / 2**20)
        if isinstance(loss_fn, str):
            rows.append({**row, "error": loss_fn})
            continue
        step = lambda: full_step(loss_fn, hidden, weight, labels)  # noqa: E731
        try:
            step()  # compiles (torch.compile, Triton) outside the measurements
            peak = peak_bytes(step, device, (hidden, weight, labels))
            low, median, high = time_ms(step, device, reps)
        except torch.OutOfMemoryError:
            rows.append({**row, "error": "out of memory"})
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
            continue
        rows.append({
            **row, "time_ms": dict(min=low, median=median, max=high), "tflops": flops / (median * 1e-3) / 1e12,
            "x_floor": median / floor_ms, "peak_mib": peak / 2**20, "extra_mib": (peak - grads_bytes) / 2**20,
            "extra_vs_full_logits": (peak - grads_bytes) / full_logits_bytes,
        })
        print(common.format_linear_row(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# Run: record (bench/common.py), results appended to bench/results/, plot (bench/plot.py)
# ----------------------------------------------------------------------------------------------------


def parse_sizes(text, device):
    if text is None:
        text = "gpu" if device.type == "cuda" else "cpu"
    if text in PRESETS:
        return PRESETS[text]
    try:
        return [tuple(int(x) for x in size.split("x")) for size in text.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: a preset {sorted(PRESETS)} or NxdxV[,NxdxV...], got {text!r}") from None


def parse_chunk_mib(text):
    try:
        budgets = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--chunk-mib: comma-separated positive integers (MiB), got {text!r}") from None
    if any(mib < 1 for mib in budgets):
        raise SystemExit(f"--chunk-mib: budgets must be >= 1 MiB, got {text!r}")
    return budgets


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", help="preset (gpu, gpu-quick, cpu) or NxdxV[,NxdxV...]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--providers", help=f"comma-separated subset of {PROVIDERS}; default: all on CUDA, "
                        "torch,fastmath on CPU")
    parser.add_argument("--chunk-mib", default="",
                        help="comma-separated logits budgets (MiB) of extra fastmath@<M>MiB providers, e.g. 2048,4096")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per provider on CPU")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    names = (args.providers or (",".join(PROVIDERS) if device.type == "cuda" else "torch,fastmath")).split(",")
    providers = {name: make_provider(name) for name in names}
    providers.update({f"fastmath@{mib}MiB": functools.partial(fused_linear_cross_entropy, chunk_bytes=mib * 2**20)
                      for mib in parse_chunk_mib(args.chunk_mib)})
    record = common.new_record(
        "cross_entropy", device, dtype=str(dtype).removeprefix("torch."), mode="full", reduction="mean",
    )
    if device.type == "cpu":
        record["note"] = (
            "CPU: the memory comparison at reduced sizes; fastmath runs its chunked PyTorch path here, not the "
            "Triton kernel. The GPU speed and memory of the Triton path are still to be measured."
        )
    print(f"{record['device']} | {record['versions']} | commit {record['git_commit']} | {record['dtype']} | "
          f"load average {record['loadavg']['start']}")
    path = common.results_path("cross_entropy", record["device"], args.out)
    common.measure_and_append(record, path, parse_sizes(args.sizes, device),
                              lambda shape: bench_shape(*shape, dtype, device, providers, args.reps),
                              lambda r: (r["N"], r["d"], r["V"]))
    if not args.no_plot:
        import plot

        plot.plot_cross_entropy(record, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
