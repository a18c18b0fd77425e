"""Benchmark: one end-to-end SFT training step: tokens/s, MFU and peak memory, side by side with HF, Liger, TRL.

    python bench/bench_sft_e2e.py                        # CUDA: preset "gpu"; CPU: preset "cpu" (about 2 minutes)
    python bench/bench_sft_e2e.py --preset gpu-quick     # CUDA: 0.5B and 1.5B at 4k and 16k tokens (the GPU suite's)
    python bench/bench_sft_e2e.py --configs qwen2.5-7b@32768 --providers fastmath,hf

A step is what `fastmath/sft.py` does per optimizer step: collate the packed rows, forward and backward
each (token-normalised accumulation), clip the gradient norm to 1.0, AdamW step, zero the gradients, and
the step's one host sync (the loss). Its wall time runs from the start of collation to that sync. Weights
are fp32 masters; CUDA runs under bf16 autocast, CPU in fp32 (the trainer's `model.precision=auto`).

Providers (each in its own process, so one crash or a CPU peak RSS never leaks into another's figures):
    fastmath   the trainer's loop with `fastmath.model.CausalLMWithLinearLoss`: the `fastmath_varlen`
               attention (Triton on CUDA, the PyTorch reference on CPU) and the fused linear cross-entropy
    hf         the same loop, with HF's own attention (`sdpa`, documents kept apart by the block mask that
               transformers builds from the restarting position_ids) and HF's own loss (the full [T, V]
               logits, upcast to fp32, `ForCausalLMLoss`)
    liger      the same loop after Liger-Kernel's `apply_liger_kernel_to_qwen2` (RoPE, RMSNorm, SwiGLU and
               its fused linear cross-entropy), with `sdpa` attention (no flash-attn on the GPU image). CUDA only
    trl        TRL's `SFTTrainer` on the same model and documents: `packing=True` (BFD), padding-free,
               `completion_only_loss`, the same AdamW settings, clip and precision, no logging or saving;
               its attention is `sdpa`, its loss TRL's own chunked LM head. Step time: between consecutive
               `on_step_end` callbacks (the Trainer's data loading, collation and step included)

Configs: "<model>@<tokens per row>". Models are Qwen2.5-style (the published 0.5B / 1.5B / 7B shapes,
random weights, no download; `embedded` is fastmath's tiny built-in Qwen2 with its real data). On CUDA each
step is one row of documents whose lengths are log-uniform in [256, min(tokens, 16384)] (fixed seed),
summing exactly to the budget, loss on every token. The CPU preset is configs/demo.yaml's step: 2 rows of
2048 tokens packed from the embedded training data, loss on the completions.

Figures per (provider, config), over the timed steps after the warm-up ones:
    tokens/s      real tokens of the step / its wall time (min / median / max over steps)
    FLOPs         6 * P * tokens + 6 * n_layers * d_attn * sum(L_i^2) per step (fastmath.metrics.training_flops:
                  P the parameters used in matmuls, lm_head included and the input embedding table excluded;
                  the attention term counts QK^T and PV over each document's causal triangle)
    MFU           FLOPs / step time / the matmul rate measured in the same run (bench/common.py floor); on
                  GPUs with a data-sheet peak, also mfu_datasheet against it
    memory        CUDA: the caching allocator's peak allocated bytes over the steps; CPU: the worker process's
                  peak RSS, and its RSS as the first step begins (model, data and trainer built; the
                  optimizer's state comes with the first step), so the difference is what training added
    loss_first    the first step's mean token loss: fastmath, hf and liger see the same weights and rows, so
                  it must agree between them (a check that they compute the same thing)

Results: one record per run appended to bench/results/sft_e2e-<device>.json (see bench/common.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import common  # noqa: E402

# The published Qwen2.5 shapes (Qwen/Qwen2.5-{0.5B,1.5B,7B} config.json); 494.0 M / 1543.7 M / 7615.6 M parameters.
QWEN25 = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
QWEN25_COMMON = dict(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu",
                     use_sliding_window=False)
PRESETS = {
    "gpu": [f"{m}@{t}" for m in QWEN25 for t in (4096, 8192, 16384, 32768)],
    # the most telling first: a short time budget cuts configs from the end of the list
    "gpu-quick": ["qwen2.5-1.5b@16384", "qwen2.5-0.5b@4096", "qwen2.5-0.5b@16384", "qwen2.5-1.5b@4096"],
    "cpu": ["embedded@2048"],
}
PROVIDERS = ("fastmath", "hf", "liger", "trl")
ATTENTION = {"fastmath": "fastmath_varlen", "hf": "sdpa", "liger": "sdpa", "trl": "sdpa"}
LOSS = {"fastmath": "fastmath fused linear cross-entropy", "hf": "HF ForCausalLMLoss on full fp32 logits",
        "liger": "Liger fused linear cross-entropy", "trl": "TRL chunked LM head (log-probs, entropy, accuracy)"}
LR = 1e-5  # any small value: the step's cost does not depend on it
RSS_AT_FIRST_STEP: list[int] = []  # the worker's RSS as the first step begins (model, data and trainer built)


# ----------------------------------------------------------------------------------------------------
# FLOPs and the derived figures (pure functions; tests/test_bench.py checks them by hand)
# ----------------------------------------------------------------------------------------------------


def qwen2_parameters(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                     vocab_size, tie_word_embeddings, **_) -> dict:
    """{"total", "matmul"} parameters of a Qwen2 decoder from its shape (q/k/v carry biases, o_proj none).

    matmul = every weight used in a matmul: all but the input embedding table, plus the lm_head (which is that
    table again when tied) -- the P of 6 * P * tokens.
    """
    d, head_dim = hidden_size, hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    attention = d * d + d + 2 * (d * kv + kv) + d * d          # q (+bias), k and v (+bias), o
    mlp = 3 * d * intermediate_size                             # gate, up, down
    layer = attention + mlp + 2 * d                             # two RMSNorm weights
    embed = vocab_size * d
    body = num_hidden_layers * layer + d                        # + the final norm
    total = embed + body + (0 if tie_word_embeddings else vocab_size * d)
    return {"total": total, "matmul": body + vocab_size * d}


def step_flops(matmul_params: int, doc_lengths: list[int], n_layers: int, d_attn: int) -> float:
    """Training FLOPs of one step over documents of these lengths (fastmath.metrics.training_flops)."""
    from fastmath.metrics import training_flops

    return training_flops(matmul_params, sum(doc_lengths), doc_lengths, n_layers, d_attn)


def derive(steps: list[dict], peak_flops: float | None, datasheet_flops: float | None) -> dict:
    """Per-step tokens/s and TFLOP/s, summarised; MFU at the median step. `steps`: {"seconds", "tokens", "flops"}."""
    tokens_per_s = [s["tokens"] / s["seconds"] for s in steps]
    flops_per_s = [s["flops"] / s["seconds"] for s in steps]
    median = sorted(steps, key=lambda s: s["seconds"])[len(steps) // 2]
    return {
        "step_s": common.summarize([s["seconds"] for s in steps]),
        "tokens_per_step": sum(s["tokens"] for s in steps) / len(steps),
        "tokens_per_s": common.summarize(tokens_per_s),
        "tflops": common.summarize([f / 1e12 for f in flops_per_s]),
        "mfu": common.mfu(median["flops"], median["seconds"], peak_flops),
        "mfu_datasheet": common.mfu(median["flops"], median["seconds"], datasheet_flops),
    }


# ----------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------


def parse_config(text: str) -> tuple[str, int]:
    model, _, tokens = text.partition("@")
    if model not in (*QWEN25, "embedded") or not tokens.isdigit():
        raise SystemExit(f"config {text!r}: expected <model>@<tokens> with model in {[*QWEN25, 'embedded']}")
    return model, int(tokens)


def build_model(model: str, attn_implementation: str, device: torch.device) -> nn.Module:
    """A Qwen2.5-shaped model with random weights (seed 0) on `device`, fp32, or the embedded one."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if attn_implementation == "fastmath_varlen":
        from kernels.hf import register

        register()
    torch.manual_seed(0)
    if model == "embedded":
        from fastmath.embedded import ensure_embedded_assets

        path = ensure_embedded_assets().model_dir
        causal_lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation=attn_implementation).to(device)
    else:
        config = Qwen2Config(**QWEN25[model], **QWEN25_COMMON)
        with torch.device(device):
            causal_lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                         attn_implementation=attn_implementation)
    causal_lm.config.use_cache = False
    return causal_lm


def random_rows(tokens: int, vocab: int, steps: int, seed: int = 0) -> list[list[tuple[list[int], list[bool]]]]:
    """`steps` rows of random documents (log-uniform lengths in [256, min(tokens, 16384)], summing to `tokens`)."""
    rng = random.Random(seed)
    longest = min(tokens, 16384)
    rows = []
    for _ in range(steps):
        lengths = []
        while sum(lengths) < tokens:
            lengths.append(int(math.exp(rng.uniform(math.log(256), math.log(longest)))))
        lengths[-1] -= sum(lengths) - tokens
        rows.append([([rng.randrange(vocab) for _ in range(n)], [True] * n) for n in lengths if n > 0])
    return rows


def embedded_rows(steps: int) -> tuple[list[list[tuple[list[int], list[bool]]]], list, object]:
    """configs/demo.yaml's first `steps` steps (each a list of packed rows), all its documents, and the tokenizer."""
    from fastmath.config import load_config
    from fastmath.data import Formatter, load_documents
    from fastmath.embedded import ensure_embedded_assets
    from fastmath.model import load_tokenizer
    from fastmath.sft import plan_steps

    config = load_config(REPO / "configs" / "demo.yaml")
    assets = ensure_embedded_assets()
    tokenizer = load_tokenizer(str(assets.model_dir))
    formatter = Formatter(tokenizer, max_length=config.data.max_length)
    docs, _ = load_documents(str(assets.data_dir / "train.jsonl"), "train", formatter)
    plan = plan_steps(docs, config.sft.tokens_per_micro_batch, config.sft.global_batch, 1, config.run.seed, steps)
    pairs = [(d.input_ids, d.loss_mask) for d in docs]
    return [[[pairs[i] for i in row] for row in step if row] for step in plan.rows], pairs, tokenizer


# ----------------------------------------------------------------------------------------------------
# Providers of the trainer's loop: each wraps the causal LM as `packed row -> summed token loss`
# ----------------------------------------------------------------------------------------------------


class CausalLMWithHFLoss(nn.Module):
    """HF's own path: the model's forward builds the full [T, V] logits and its `loss_function` takes the sum."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, batch) -> torch.Tensor:
        logits = self.causal_lm(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        return self.causal_lm.loss_function(logits=logits, labels=None, vocab_size=self.causal_lm.config.vocab_size,
                                            shift_labels=batch.targets, num_items_in_batch=1)


class CausalLMWithLigerLoss(nn.Module):
    """Liger's patched forward: its fused linear cross-entropy on the final hidden states (sum: 1 item)."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                    model=causal_lm)
        self.causal_lm = causal_lm

    def forward(self, batch) -> torch.Tensor:
        return self.causal_lm(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.targets,
                              shift_labels=batch.targets, num_items_in_batch=1, use_cache=False).loss


def wrap(provider: str, causal_lm: nn.Module) -> nn.Module:
    from fastmath.model import CausalLMWithLinearLoss

    if provider == "fastmath":
        return CausalLMWithLinearLoss(causal_lm)
    if provider == "hf":
        return CausalLMWithHFLoss(causal_lm)
    if provider == "liger":
        return CausalLMWithLigerLoss(causal_lm)
    raise ValueError(f"unknown loop provider {provider!r}")


def our_loop_steps(provider: str, causal_lm: nn.Module, steps_rows, device: torch.device) -> list[dict]:
    """Run the trainer's step over each entry of `steps_rows`; per step: seconds, tokens, doc lengths, loss."""
    from fastmath.config import Config
    from fastmath.model import mixed_precision
    from fastmath.packing import collate_packed
    from fastmath.sft import accumulate_gradients
    from fastmath.stage import build_optimizer, optim_settings

    model = wrap(provider, causal_lm).to(device)
    model.train()
    config = Config()
    config.sft.lr = LR
    optimizer = build_optimizer(model, optim_settings(config, "sft"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    _, autocast = mixed_precision(config.model.precision, device)  # the trainer's rule: bf16 on CUDA

    out = []
    for rows in steps_rows:
        if not out:
            RSS_AT_FIRST_STEP.append(common.current_rss_bytes())
        common.synchronize(device)
        started = time.perf_counter()
        batches = [collate_packed(row) for row in rows]
        loss_tokens = sum(b.num_loss_tokens for b in batches)
        loss_sum = accumulate_gradients(model, batches, loss_tokens, 1, device, autocast)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_sum.item() / loss_tokens  # the step's one host sync
        seconds = time.perf_counter() - started
        out.append({"seconds": seconds, "tokens": sum(b.num_tokens for b in batches),
                    "doc_lengths": [n for b in batches for n in b.doc_lengths], "loss": loss})
    del optimizer, model
    return out


# ----------------------------------------------------------------------------------------------------
# TRL's SFTTrainer on the same model and documents
# ----------------------------------------------------------------------------------------------------


def trl_steps(causal_lm: nn.Module, docs: list[tuple[list[int], list[bool]]], tokenizer, tokens_per_row: int,
              rows_per_step: int, n_steps: int, device: torch.device) -> list[dict]:
    """Train `n_steps` steps with SFTTrainer; per step: seconds (between step ends), tokens, doc lengths, loss."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    micro: list[dict] = []
    out: list[dict] = []

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            cu = inputs["cu_seq_lens_q"]
            micro.append({"tokens": int(inputs["input_ids"].shape[1]), "doc_lengths": cu.diff().tolist()})
            loss = super().training_step(model, inputs, *args, **kwargs)
            micro[-1]["loss"] = float(loss)  # TRL's compute_loss already syncs (entropy, accuracy .item())
            return loss

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            RSS_AT_FIRST_STEP.append(common.current_rss_bytes())
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            common.synchronize(device)
            now = time.perf_counter()
            out.append({"seconds": now - self.last, "tokens": sum(m["tokens"] for m in micro),
                        "doc_lengths": [n for m in micro for n in m["doc_lengths"]],
                        "loss": micro[0]["loss"] if micro else None})
            micro.clear()
            self.last = now

    dataset = Dataset.from_dict({"input_ids": [ids for ids, _ in docs],
                                 "completion_mask": [[int(m) for m in mask] for ids, mask in docs]})
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=n_steps, per_device_train_batch_size=rows_per_step,
            gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
            bf16=device.type == "cuda", use_cpu=device.type == "cpu", packing=True, packing_strategy="bfd",
            padding_free=True, max_length=tokens_per_row, completion_only_loss=True, report_to="none",
            save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        trainer = Timed(model=causal_lm, args=args, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=[StepEnds()])
        trainer.train()
    return out


# ----------------------------------------------------------------------------------------------------
# Worker: one provider, every config, rows written as they finish
# ----------------------------------------------------------------------------------------------------


def available(provider: str, device: torch.device) -> str | None:
    """None if the provider can run here, else why not."""
    import importlib.util

    if provider == "liger":
        if device.type != "cuda":
            return "Liger-Kernel's kernels are Triton: CUDA only for a throughput figure"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel not installed (carry its wheel to the GPU image)"
    if provider == "trl":
        missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            return f"not installed: {', '.join(missing)}"
    return None


def run_config(provider: str, config: str, device: torch.device, warmup: int, steps: int) -> dict:
    model_name, tokens = parse_config(config)
    n_steps = warmup + steps
    if model_name == "embedded":
        steps_rows, all_docs, tokenizer = embedded_rows(n_steps)
        rows_per_step = max(len(rows) for rows in steps_rows)
    else:
        steps_rows = [[row] for row in random_rows(tokens, QWEN25[model_name]["vocab_size"], n_steps)]
        all_docs, tokenizer, rows_per_step = [d for rows in steps_rows for row in rows for d in row], None, 1
    allocated_before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    causal_lm = build_model(model_name, ATTENTION[provider], device)
    from fastmath.metrics import attention_dims, peak_flops
    from fastmath.model import count_parameters

    params = count_parameters(causal_lm)
    n_layers, d_attn = attention_dims(causal_lm.config)
    row = {"provider": provider, "config": config, "model": model_name, "tokens_per_row": tokens,
           "rows_per_step": rows_per_step, "attention": ATTENTION[provider], "loss": LOSS[provider],
           "params_total": params["total"], "params_matmul": params["matmul"], "n_layers": n_layers,
           "d_attn": d_attn, "warmup_steps": warmup, "timed_steps": steps}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    RSS_AT_FIRST_STEP.clear()
    if provider == "trl":
        if tokenizer is None:  # random weights: any tokenizer serves for the pad id; the data is pre-tokenised
            from fastmath.embedded import ensure_embedded_assets
            from fastmath.model import load_tokenizer

            tokenizer = load_tokenizer(str(ensure_embedded_assets().model_dir))
        done = trl_steps(causal_lm, all_docs, tokenizer, tokens, rows_per_step, n_steps, device)
    else:
        done = our_loop_steps(provider, causal_lm, steps_rows, device)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["allocated_before_model_gib"] = allocated_before / 2**30  # > 0 only if an earlier config leaked
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        row["rss_before_steps_mib"] = RSS_AT_FIRST_STEP[0] / 2**20
        row["peak_rss_mib"] = common.peak_rss_bytes() / 2**20
    if len(done) <= warmup:
        raise RuntimeError(f"only {len(done)} steps ran, fewer than warm-up + 1")
    timed = [dict(s, flops=step_flops(params["matmul"], s["doc_lengths"], n_layers, d_attn)) for s in done[warmup:]]
    row["loss_first"] = done[0]["loss"]
    row["docs_per_step"] = sum(len(s["doc_lengths"]) for s in timed) / len(timed)
    row["flops_per_step"] = sum(s["flops"] for s in timed) / len(timed)
    row.update(derive(timed, None, peak_flops(device)))
    del causal_lm
    return row


def worker(args) -> None:
    """Run every config for one provider, appending one JSON line per config to args.worker_out."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for config in args.configs:
        if args.deadline and time.time() > args.deadline:
            row = {"provider": args.worker, "config": config, "error": "skipped: out of the time budget"}
        else:
            try:
                row = run_config(args.worker, config, device, args.warmup, args.steps)
            except torch.OutOfMemoryError as err:
                row = {"provider": args.worker, "config": config, "error": f"out of memory: {str(err)[:200]}"}
            except Exception as err:  # recorded, not fatal: the next config may still run
                row = {"provider": args.worker, "config": config, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        with open(args.worker_out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(format_row(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Parent: floor, one worker process per provider, derived figures, record
# ----------------------------------------------------------------------------------------------------


def format_row(r: dict) -> str:
    head = f"{r['config']:>20} {r['provider']:>9}:"
    if "error" in r:
        return f"{head} {r['error']}"
    memory = (f"peak {r['peak_memory_gib']:6.1f} GiB" if "peak_memory_gib" in r
              else f"peak RSS {r['peak_rss_mib']:6.0f} MiB (before steps {r['rss_before_steps_mib']:.0f})")
    mfu = "" if r.get("mfu") is None else f"  MFU {100 * r['mfu']:5.1f}% of measured"
    return (f"{head} {r['tokens_per_s']['median']:10.0f} tokens/s [{r['tokens_per_s']['min']:.0f}, "
            f"{r['tokens_per_s']['max']:.0f}]  {r['tflops']['median']:8.3f} TFLOP/s{mfu}  {memory}  "
            f"first loss {r['loss_first']:.4f}")


def run_provider(provider: str, configs: list[str], args, deadline: float | None, into: list[dict]) -> None:
    """Run one provider's worker; its rows go into `into` even when this process is stopped meanwhile."""
    command = [sys.executable, __file__, "--worker", provider, "--device", args.device, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--threads", str(args.threads or 0), "--configs", *configs]
    if deadline:
        command += ["--deadline", str(deadline)]
    timeout = None if deadline is None else max(30.0, deadline - time.time() + 15)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    failure = "no result"
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as rows_file:
        try:
            proc = subprocess.run(command + ["--worker-out", rows_file.name], timeout=timeout, env=env,
                                  stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                failure = f"worker exit {proc.returncode}: {proc.stderr[-400:]}"
        except subprocess.TimeoutExpired:
            failure = "worker killed: out of the time budget"
        except BaseException:  # stopped from outside (SIGTERM, Ctrl-C): keep what the worker finished
            failure = "benchmark stopped from outside"
            raise
        finally:
            rows = [json.loads(line) for line in Path(rows_file.name).read_text().splitlines() if line.strip()]
            for config in configs[len(rows):]:
                rows.append({"provider": provider, "config": config, "error": failure})
                print(format_row(rows[-1]), flush=True)
            into.extend(rows)


def add_measured_mfu(rows: list[dict], floor: dict) -> None:
    """MFU against the matmul rate measured in this run, at each row's median step."""
    peak = floor["matmul"]["tflops"] * 1e12
    for row in rows:
        if "error" not in row:
            row["mfu"] = common.mfu(row["flops_per_step"], row["step_s"]["median"], peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on CUDA, cpu otherwise")
    parser.add_argument("--configs", nargs="+", help="<model>@<tokens> ... (overrides --preset)")
    parser.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 2 on CUDA, 3 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 5 on CUDA, 12 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in the workers (0: torch's default)")
    parser.add_argument("--time-budget", type=float, help="seconds for all providers; configs that do not fit are "
                        "recorded as skipped")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 3)
    args.steps = args.steps if args.steps is not None else (5 if cuda else 12)
    if args.worker:
        worker(args)
        return

    common.exit_on_sigterm()
    device = torch.device(args.device)
    configs = args.configs or PRESETS[args.preset or ("gpu" if cuda else "cpu")]
    for config in configs:
        parse_config(config)
    names = (args.providers or ",".join(PROVIDERS)).split(",")
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {PROVIDERS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    record = common.new_record(
        "sft_e2e", device, configs=configs, warmup_steps=args.warmup, timed_steps=args.steps,
        precision="bf16 autocast, fp32 master weights" if cuda else "fp32",
        skipped={}, note=("CPU: fastmath runs its PyTorch reference attention and chunked loss here, not the "
                          "Triton kernels" if not cuda else None),
    )
    print(f"{record['device']} | torch {torch.__version__} | commit {record['git_commit']} | "
          f"load average {record['loadavg']['start']} | {torch.get_num_threads()} threads", flush=True)
    record["floor"] = common.measure_floor(device)
    print("floor: " + common.format_floor(record["floor"]), flush=True)
    started = time.time()
    runnable = []
    for name in names:
        reason = available(name, device)
        if reason:
            record["skipped"][name] = reason
            print(f"skipping {name}: {reason}", flush=True)
        else:
            runnable.append(name)
    path = common.results_path("sft_e2e", record["device"], args.out)
    try:
        for k, name in enumerate(runnable):
            deadline = None
            if args.time_budget:  # an equal share of what is left for each provider still to run
                left = args.time_budget - (time.time() - started)
                deadline = time.time() + left / (len(runnable) - k)
            run_provider(name, configs, args, deadline, record["results"])
    finally:
        add_measured_mfu(record["results"], record["floor"])
        if record["results"]:
            common.append_record(record, path)
            print(f"appended to {path}")
    print()
    print(summary_table(record))


def summary_table(record: dict) -> str:
    lines = ["| config | provider | tokens/s (median) | MFU vs measured | peak memory | first loss |",
             "|---|---|---|---|---|---|"]
    for r in record["results"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['provider']} | {r['error'][:60]} | | | |")
            continue
        memory = (f"{r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else f"{r['peak_rss_mib']:.0f} MiB RSS")
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['config']} | {r['provider']} | {r['tokens_per_s']['median']:.0f} | {mfu} | {memory} | "
                     f"{r['loss_first']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
