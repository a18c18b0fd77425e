"""Benchmark: packed-sequence (varlen) causal attention, forward / backward / forward+backward TFLOP/s.

    python bench/bench_attention.py             # CUDA: the sweep below; CPU: a tiny dry run (see below)
    python bench/bench_attention.py --quick     # CUDA: 16k tokens only
    python bench/bench_attention.py --plot      # also draw bench/results/attention-<device>.png (matplotlib)

Layouts: total tokens 8k / 16k / 32k / 64k made of documents of mixed lengths (log-uniform in [64, 4096],
fixed seed), head dims 64 / 128, 32 query heads with GQA 1 (32 kv heads) and 8 (4 kv heads), bf16, causal.

Providers (each gets its inputs prepared outside the timed region):
    fastmath     kernels.varlen_attention, the Triton kernels (autotuned on the first call, not timed)
    sdpa_padded  F.scaled_dot_product_attention on the documents padded to the longest one, is_causal
                 (padding sits after each document, so the causal mask hides it from real queries)
    flex         torch.compile(flex_attention) with a document-causal block mask (built once per layout)
    varlen_attn  torch.nn.attention.varlen.varlen_attn (PyTorch's FlashAttention varlen binding)
    flash_attn   flash_attn.flash_attn_varlen_func, when installed
On a machine without CUDA the script runs a dry run instead: 256 / 512 tokens, head dim 64, fp32, one
thread, the kernels' PyTorch reference (`reference`) against `sdpa_padded`, timed with perf_counter, and
says which GPU providers it skipped and why.

FLOPs are counted as flash-attn counts them, on the real document lengths only: forward 4 * Hq * D *
sum(L_i^2) / 2 (causal), backward 2.5x forward, forward+backward 3.5x. Padded or masked-out work is not
counted, so a provider that does it pays for it in TFLOP/s. Timings: triton.testing.do_bench (median of
repeated runs after warm-up, gradients reset between backward runs), reported as min / median / max ms.

The floor: the same FLOPs at the matmul rate measured in the same run (bench/common.py: an 8192^3 bf16
product on CUDA, 1024^3 fp32 on CPU); x_floor = median time / floor time (attention's softmax work and
causal-block raggedness keep even flash-attn above 1).

Results: one record per run appended to bench/results/attention-<device>.json (a JSON list): device,
versions, git commit, date, load average (bench/common.py), the floor, and per (layout, provider, mode) the
timings, TFLOP/s at the median and x_floor; also the largest |out - out_sdpa| of every provider (a numerics
check in the benchmark's dtype).
"""

import argparse
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import common  # noqa: E402
from kernels.attention import varlen_attention  # noqa: E402

RESULTS = common.RESULTS
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # flash-attn's backward = 2.5 x forward


# ----------------------------------------------------------------------------------------------------
# Layouts and FLOPs
# ----------------------------------------------------------------------------------------------------


def document_lengths(total: int, seed: int, shortest: int = 64, longest: int = 4096) -> list[int]:
    """Log-uniform document lengths in [shortest, longest] summing to total (the last one trimmed)."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(math.exp(rng.uniform(math.log(shortest), math.log(longest)))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def forward_flops(lengths, heads_q, head_dim, causal=True) -> float:
    """flash-attn's count: 2 matmuls of 2 * L^2 * D FLOPs per head and document, halved when causal."""
    return 4.0 * heads_q * head_dim * sum(n * n for n in lengths) / (2.0 if causal else 1.0)


# ----------------------------------------------------------------------------------------------------
# Providers: each takes (q, k, v, lengths) in the varlen layout and returns fn(q, k, v) -> out [T, Hq, D]
# ----------------------------------------------------------------------------------------------------


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def provider_varlen(backend):
    def build(q, k, v, lengths):
        cu, longest = _cu_seqlens(lengths, q.device), max(lengths)
        return lambda q, k, v: varlen_attention(q, k, v, cu, cu, longest, longest, causal=True, backend=backend)

    return build


def provider_sdpa_padded(q, k, v, lengths):
    """Pad every document to the longest; the timed call sees [n_docs, H, L_max, D] inputs."""
    longest = max(lengths)
    index = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths)]).to(q.device)

    def pad(t):
        padded = t.new_zeros(len(lengths) * longest, *t.shape[1:])
        padded[index] = t.detach()
        return padded.view(len(lengths), longest, *t.shape[1:]).transpose(1, 2).requires_grad_()

    padded = [pad(t) for t in (q, k, v)]

    def fn(q, k, v):  # q, k, v stand for their padded copies
        out = F.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(-1, *q.shape[1:])[index]

    fn.grad_inputs = padded
    return fn


def provider_flex(q, k, v, lengths):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    total = q.shape[0]
    block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    def fn(q, k, v):
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, D]
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)

    return fn


def provider_varlen_attn(q, k, v, lengths):
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = _cu_seqlens(lengths, q.device), max(lengths)
    return lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True)


def provider_flash_attn(q, k, v, lengths):
    from flash_attn import flash_attn_varlen_func

    cu, longest = _cu_seqlens(lengths, q.device), max(lengths)
    return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)


def gpu_providers():
    """name -> builder, and name -> why it is skipped."""
    providers = {"fastmath": provider_varlen("triton"), "sdpa_padded": provider_sdpa_padded, "flex": provider_flex}
    skipped = {}
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        providers["varlen_attn"] = provider_varlen_attn
    except ImportError as e:
        skipped["varlen_attn"] = f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})"
    try:
        import flash_attn  # noqa: F401

        providers["flash_attn"] = provider_flash_attn
    except ImportError as e:
        skipped["flash_attn"] = f"not installed ({e})"
    return providers, skipped


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def cpu_bench(fn, reps=5):
    """perf_counter timings (ms) after one warm-up call: the dry-run stand-in for do_bench."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def cuda_bench(fn, grad_to_none):
    import triton.testing

    times = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="all")
    return list(times)


def time_modes(fn, q, k, v, bench):
    """ms timings per mode. fwd runs without autograd; bwd replays backward through one retained graph."""
    inputs = getattr(fn, "grad_inputs", [q, k, v])
    grad_out = torch.randn_like(q)
    timings = {}
    with torch.no_grad():
        timings["fwd"] = bench(lambda: fn(q, k, v), None)
    out = fn(q, k, v)
    timings["bwd"] = bench(lambda: out.backward(grad_out, retain_graph=True), inputs)
    timings["fwd+bwd"] = bench(lambda: fn(q, k, v).backward(grad_out), inputs)
    return timings


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


def run_layout(total, heads_q, heads_kv, head_dim, providers, dtype, device, bench, floor, seed=0):
    lengths = document_lengths(total, seed, longest=min(4096, total))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(total, h, head_dim, generator=gen).to(device, dtype).requires_grad_()
        for h in (heads_q, heads_kv, heads_kv)
    )
    layout = dict(total_tokens=total, n_docs=len(lengths), max_seqlen=max(lengths), heads_q=heads_q,
                  heads_kv=heads_kv, head_dim=head_dim, dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    flops = forward_flops(lengths, heads_q, head_dim)
    rows, outputs = [], {}
    for name, build in providers.items():
        try:
            fn = build(q, k, v, lengths)
            with torch.no_grad():
                outputs[name] = fn(q, k, v).float()  # also the first (compiling / autotuning) call
            timings = time_modes(fn, q, k, v, bench)
        except Exception as e:  # a provider that cannot run this layout (OOM, unsupported) is recorded, not fatal
            rows.append(dict(layout, provider=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"  {name:12s} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        for mode in MODES:
            ms = timings[mode]
            median = statistics.median(ms)
            tflops = FLOP_FACTOR[mode] * flops / (median * 1e-3) / 1e12
            timing = dict(min=min(ms), median=median, max=max(ms))
            floor_ms = FLOP_FACTOR[mode] * flops / (floor["matmul"]["tflops"] * 1e12) * 1e3
            rows.append(dict(layout, provider=name, mode=mode, ms=timing, tflops=tflops, floor_ms=floor_ms,
                             x_floor=median / floor_ms))
            print(f"  {name:12s} {mode:8s} {median:9.3f} ms  {tflops:8.3f} TFLOP/s")
        for t in (q, k, v):
            t.grad = None
    baseline = outputs.get("sdpa_padded")
    for row in rows:
        if baseline is not None and row["provider"] in outputs:
            row["max_abs_diff_vs_sdpa"] = (outputs[row["provider"]] - baseline).abs().max().item()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CUDA: only 16k tokens")
    parser.add_argument("--plot", action="store_true", help="also draw bench/results/attention-<device>.png")
    args = parser.parse_args()

    record = common.new_record("varlen_attention", causal=True)
    record.pop("results")  # re-added after the skips, keeping the key order of earlier runs
    if torch.cuda.is_available():
        providers, skipped = gpu_providers()
        totals = [16384] if args.quick else [8192, 16384, 32768, 65536]
        shapes = [(t, 32, kv, hd) for hd in (64, 128) for kv in (32, 4) for t in totals]
        dtype, device, bench = torch.bfloat16, "cuda", cuda_bench
        record.update(dry_run=False)
    else:
        providers = {"reference": provider_varlen("reference"), "sdpa_padded": provider_sdpa_padded}
        reason = "no CUDA device (Triton kernels, compiled FlexAttention and FlashAttention bindings need one)"
        skipped = {name: reason for name in ("fastmath", "flex", "varlen_attn", "flash_attn")}
        shapes = [(t, 4, kv, 64) for kv in (4, 1) for t in (256, 512)]
        dtype, device, bench = torch.float32, "cpu", lambda fn, grads: cpu_bench(fn)
        # One thread: OpenMP threads that spin while another process holds a core distort a dry run 30x.
        torch.set_num_threads(1)
        record.update(dry_run=True, threads=1)
        print(f"dry run on CPU: {reason}; timing the PyTorch reference against padded SDPA at tiny sizes")
    record["floor"] = common.measure_floor(device, dtype)
    print("floor: " + common.format_floor(record["floor"]))
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")
    record.update(skipped=skipped, results=[])

    def measure(layout):
        total, heads_q, heads_kv, head_dim = layout
        print(f"{total} tokens, Hq={heads_q} Hkv={heads_kv} D={head_dim}, {dtype}")
        return run_layout(total, heads_q, heads_kv, head_dim, providers, dtype, device, bench, record["floor"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = common.measure_and_append(record, common.results_path("attention", record["device"]), shapes, measure,
                                         lambda r: (r["total_tokens"], r["heads_kv"], r["head_dim"]), "layouts")
    if path and args.plot:
        import plot as plots

        plots.plot_attention(record, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
