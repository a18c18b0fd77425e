"""Benchmark: LM head + GRPO loss (hidden states -> loss), forward+backward time and peak memory, per provider.

The workload is the GRPO step's loss: N completion tokens in B = N / T sequences of T tokens (equal lengths, so
the packed and the padded layouts hold the same tokens), off-policy old log-probs (ratios != 1, some clipped),
one advantage per sequence, loss type "dapo", token-level ratios, beta = 0, temperature 1; gradients for the
hidden states and the LM-head weight.

Providers:
    fastmath  kernels.fused_linear_grpo_loss on the packed [N, d] tokens (Triton on CUDA; the chunked PyTorch
              path on CPU)
    trl       TRL 1.16's eager way on the padded [B, T, d] batch: logits = hidden @ weight.T (full [N, V] in the
              input dtype), / temperature, `trl.trainer.utils.selective_log_softmax`, then `_compute_loss`'s
              formulas for "dapo"
    compile   torch.compile of the same function (first call, the compile, excluded from timings)
    liger     Liger-Kernel's LigerFusedLinearGRPOLoss (chunked, torch.compile'd on CUDA, eager on CPU; skipped
              with a note when liger_kernel is missing)

What is measured (forward + backward, the only mode that matters for training):
    time      CUDA: triton.testing.do_bench (min / median / max over its repetitions); CPU: perf_counter over
              --reps runs after a warm-up run and the memory run.
    TFLOP/s   6 * N * d * V / time (logits, d hidden, d weight; elementwise work not counted).
    floor     6 * N * d * V / the measured rate of one [min(N, 4096), d] x [d, V] matmul in the same dtype: the
              three matmuls alone. x_floor = time / floor.
    memory    peak bytes allocated during one forward+backward beyond the inputs (CUDA: the caching allocator's
              peak; CPU: bench/common.py's PeakStorageBytes). extra = peak - the gradients' own bytes, compared
              with the full logits' N * V * itemsize.

Presets (--sizes): "gpu" is N in {8k, 16k, 32k, 64k}, d = 4096, V = 151936 (Qwen2.5), bf16, all providers (T =
1024); "gpu-quick" (also --quick, the GPU suite's stage) is N = 16k with fastmath, trl, liger; "cpu" is a tiny
fp32 run (N = 1024, d = 128, V in {32000, 151936}, T = 128; trl, liger, fastmath; about 1.5 minutes on 2 cores).
Default: "gpu" on a CUDA machine, "cpu" otherwise. GPU numbers are still to be measured: every record so far
comes from the CPU preset, where fastmath runs its chunked PyTorch path, not the Triton kernels.

Results are appended to bench/results/grpo-<device>.json (bench/common.py's record: device, versions, commit,
date, load average, shapes, min / median / max) and plotted to the .png beside it.

    python bench/bench_grpo.py                        # the preset for this machine
    python bench/bench_grpo.py --quick                # N = 16k on a GPU
    python bench/bench_grpo.py --sizes 8192x4096x151936 --providers trl,fastmath --seq-len 512
"""

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import common  # noqa: E402
from common import peak_bytes  # noqa: E402
from kernels.grpo import fused_linear_grpo_loss  # noqa: E402

PRESETS = {
    "gpu": [(n, 4096, 151936) for n in (8192, 16384, 32768, 65536)],
    "gpu-quick": [(16384, 4096, 151936)],
    "cpu": [(1024, 128, 32000), (1024, 128, 151936)],
}
SEQ_LEN = {"gpu": 1024, "gpu-quick": 1024, "cpu": 128}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fastmath", "trl", "liger", "compile")
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.2


# ----------------------------------------------------------------------------------------------------
# Providers: each maps the batch (a dict, below) -> scalar loss
# ----------------------------------------------------------------------------------------------------


def _selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax

        return selective_log_softmax, "trl.trainer.utils.selective_log_softmax"
    except ImportError:
        def gather_log_softmax(logits, index):
            return torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)

        return gather_log_softmax, "log_softmax + gather (trl not importable)"


SELECTIVE_LOG_SOFTMAX, SELECTIVE_LOG_SOFTMAX_NAME = _selective_log_softmax()


def trl_style_loss(hidden3, weight, ids, old, advantages, mask, num_items, temperature=1.0):
    """TRL 1.16's GRPO loss path on padded [B, T] tensors: full logits, selective log-softmax, "dapo"."""
    logits = (hidden3 @ weight.T) / temperature
    logps = SELECTIVE_LOG_SOFTMAX(logits, ids)
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - EPSILON_LOW, 1 + EPSILON_HIGH)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    return (per_token_loss * mask).sum() / num_items.clamp(min=1.0)


def make_provider(name, device):
    """The loss function of a provider (batch -> loss), or a string saying why it cannot run here."""
    if name == "fastmath":
        return lambda b: fused_linear_grpo_loss(
            b["hidden"], b["weight"], b["targets"], b["old"], b["advantages"], b["seq_ids"], loss_type="dapo",
            epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, num_items_in_batch=b["num_items"],
        )[0]
    padded = lambda fn: lambda b: fn(  # noqa: E731
        b["hidden"].view(*b["ids"].shape, -1), b["weight"], b["ids"], b["old"].view(b["ids"].shape), b["advantages"],
        b["mask"], b["num_items"],
    )
    if name == "trl":
        return padded(trl_style_loss)
    if name == "compile":
        return padded(torch.compile(trl_style_loss))
    if name == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as err:
            return f"liger_kernel not importable: {err}"
        module = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH,
            compiled=device.type == "cuda",
        )
        return lambda b: module(
            b["hidden"].view(*b["ids"].shape, -1), b["weight"], b["ids"], b["mask"], b["advantages"],
            old_per_token_logps=b["old"].view(b["ids"].shape), num_items_in_batch=b["num_items"],
        )[0]
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


def make_batch(n, d, v, seq_len, dtype, device):
    """N tokens in N / seq_len sequences; old log-probs near the current ones (ratios around 1, some clipped)."""
    if n % seq_len:
        raise SystemExit(f"N = {n} must be a multiple of the sequence length {seq_len} (--seq-len)")
    gen = torch.Generator(device=device).manual_seed(0)
    b = n // seq_len
    hidden = (torch.randn(n, d, generator=gen, device=device) / d**0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, device=device) / d**0.25).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    # Plausible old log-probs without a full-logits pass: -log V plus noise (ratios spread around e^(+-0.3)).
    old = -torch.log(torch.tensor(float(v))) + 0.3 * torch.randn(n, generator=gen, device=device)
    return dict(
        hidden=hidden, weight=weight, targets=targets, ids=targets.view(b, seq_len), old=old,
        advantages=torch.randn(b, generator=gen, device=device),
        seq_ids=torch.arange(b, device=device).repeat_interleave(seq_len),
        mask=torch.ones(b, seq_len, device=device), num_items=torch.tensor(float(n), device=device),
    )


def full_step(loss_fn, batch):
    batch["hidden"].grad = batch["weight"].grad = None
    loss_fn(batch).backward()


def time_ms(step, device, reps):
    """{min, median, max, n} milliseconds of one forward+backward."""
    if device.type == "cuda":
        import triton.testing

        low, median, high = triton.testing.do_bench(step, quantiles=[0.0, 0.5, 1.0])
        return dict(min=low, median=median, max=high)
    return common.summarize(common.time_ms(step, device, reps=reps, warmup=0))  # the caller warmed up


def matmul_tflops(rows, d, v, dtype, device, reps):
    """Measured rate of the chunk-shaped matmul [rows, d] x [d, V] that dominates every provider."""
    a, b = torch.randn(rows, d, device=device).to(dtype), torch.randn(d, v, device=device).to(dtype)
    a @ b  # warm-up
    median = time_ms(lambda: a @ b, device, reps)["median"]
    return 2 * rows * d * v / (median * 1e-3) / 1e12


def bench_shape(n, d, v, seq_len, dtype, device, providers, reps):
    """One result row per provider at one shape; failures (e.g. out of memory) are recorded, not raised."""
    batch = make_batch(n, d, v, seq_len, dtype, device)
    flops = 6 * n * d * v
    floor_ms = flops / (matmul_tflops(min(n, 4096), d, v, dtype, device, reps) * 1e12) * 1e3
    grads_bytes = (batch["hidden"].numel() + batch["weight"].numel()) * batch["hidden"].element_size()
    full_logits_bytes = n * v * batch["hidden"].element_size()
    rows = []
    for name, loss_fn in providers.items():
        row = dict(N=n, d=d, V=v, T=seq_len, provider=name, floor_ms=floor_ms,
                   full_logits_mib=full_logits_bytes / 2**20)
        if isinstance(loss_fn, str):
            rows.append({**row, "error": loss_fn})
            print(f"N={n:>6} d={d:>5} V={v:>6} {name:>9}: skipped ({loss_fn})", flush=True)
            continue
        step = lambda: full_step(loss_fn, batch)  # noqa: E731
        try:
            step()  # compiles (torch.compile, Triton) outside the measurements
            peak = peak_bytes(step, device, batch.values())  # also the CPU timings' warm-up
            timing = time_ms(step, device, reps)
        except torch.OutOfMemoryError:
            rows.append({**row, "error": "out of memory"})
            batch["hidden"].grad = batch["weight"].grad = None
            torch.cuda.empty_cache()
            print(f"N={n:>6} d={d:>5} V={v:>6} {name:>9}: out of memory", flush=True)
            continue
        rows.append({
            **row, "time_ms": timing, "tflops": flops / (timing["median"] * 1e-3) / 1e12,
            "x_floor": timing["median"] / floor_ms, "peak_mib": peak / 2**20,
            "extra_mib": (peak - grads_bytes) / 2**20, "extra_vs_full_logits": (peak - grads_bytes) / full_logits_bytes,
        })
        print(common.format_linear_row(rows[-1]), flush=True)
    return rows


def device_is_cpu(record):
    return record["device"].startswith("CPU")


def plot(record, path):
    """Median time and extra memory per provider and shape (one bar group per shape), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["results"] if "time_ms" in r]
    if not rows:
        return
    shapes = list(dict.fromkeys((r["N"], r["d"], r["V"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.5 * len(shapes) * len(providers) / 2), 7))
    for k, provider in enumerate(providers):
        by_shape = {(r["N"], r["d"], r["V"]): r for r in rows if r["provider"] == provider}
        present = [s for s in shapes if s in by_shape]
        xs = [shapes.index(s) + k * width for s in present]
        axes[0].bar(xs, [by_shape[s]["time_ms"]["median"] for s in present], width, label=provider)
        axes[1].bar(xs, [max(by_shape[s]["extra_mib"], 1e-3) for s in present], width, label=provider)
    labels = [f"N={n}\nd={d}\nV={v}" for n, d, v in shapes]
    for ax, ylabel in zip(axes, ("forward+backward, median ms", "extra memory, MiB")):
        ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(shapes))], labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    where = "CPU: fastmath = PyTorch path; GPU still to be measured" if device_is_cpu(record) else "Triton path"
    axes[0].set_title(f"linear + GRPO loss (dapo, token level), {record['dtype']}, {record['device']}\n"
                      f"{record['date'][:10]}, commit {(record.get('git_commit') or '?')[:8]}, {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Run: record (bench/common.py), results appended to bench/results/, plot
# ----------------------------------------------------------------------------------------------------


def parse_sizes(text, device):
    if text is None:
        text = "gpu" if device.type == "cuda" else "cpu"
    if text in PRESETS:
        return text, PRESETS[text]
    try:
        return None, [tuple(int(x) for x in size.split("x")) for size in text.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: a preset {sorted(PRESETS)} or NxdxV[,NxdxV...], got {text!r}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", help="preset (gpu, gpu-quick, cpu) or NxdxV[,NxdxV...]")
    parser.add_argument("--quick", action="store_true", help="the gpu-quick preset (N = 16k; fastmath, trl, liger)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--providers", help=f"comma-separated subset of {PROVIDERS}; default: all for the gpu "
                        "preset, fastmath,trl,liger otherwise")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence T (default: 1024 on GPU presets, 128 on cpu)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per provider on CPU")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, sizes = parse_sizes("gpu-quick" if args.quick else args.sizes, device)
    seq_len = args.seq_len or SEQ_LEN.get(preset, 128 if device.type == "cpu" else 1024)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    names = (args.providers or (",".join(PROVIDERS) if preset == "gpu" else "fastmath,trl,liger")).split(",")
    providers = {name: make_provider(name, device) for name in names}
    record = common.new_record(
        "grpo", device, dtype=str(dtype).removeprefix("torch."), mode="full", loss_type="dapo",
        importance_sampling_level="token", beta=0.0, seq_len=seq_len,
        trl_log_softmax=SELECTIVE_LOG_SOFTMAX_NAME,
    )
    record["note"] = (
        "CPU: a tiny fp32 run; fastmath runs its chunked PyTorch path here, not the Triton kernels. GPU speed "
        "and memory of the Triton path are still to be measured (bench/bench_grpo.py --sizes gpu on a GPU). "
        "At N = 1024 the PyTorch path's default chunk (rows of 64 MiB fp32 logits: 524 at V = 32000, 110 at "
        "V = 151936) holds two buffers (logits and softmax numerators), about the full logits at V = 32000; "
        "Liger's chunk is one sequence (128 rows). Timings on a shared 2-core machine: see loadavg."
        if device.type == "cpu" else "GPU run: the Triton path."
    )
    print(f"{record['device']} | {record['versions']} | commit {record['git_commit']} | {record['dtype']} | "
          f"T = {seq_len} | load average {record['loadavg']['start']}")
    path = common.results_path("grpo", record["device"], args.out)
    common.measure_and_append(record, path, sizes,
                              lambda shape: bench_shape(*shape, seq_len, dtype, device, providers, args.reps),
                              lambda r: (r["N"], r["d"], r["V"]))
    if not args.no_plot:
        plot(record, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
