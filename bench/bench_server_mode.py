"""GRPO generation and weight-sync time, server mode beside colocate mode, for the same small run.

    python bench/bench_server_mode.py [--steps 6] [--cache DIR]

Runs the same GRPO run twice with `fastmath/train.py` on the embedded model (one training process): once with
vLLM colocated in the training process (`grpo.rollout.vllm_mode=colocate`, `grpo.rollout.generator=vllm`, weights
copied in place) and once against a vLLM server started here with `python -m fastmath.serve` on 127.0.0.1
(weights pushed over the gloo group). From each run's metrics.jsonl it reports, per mode, the min / median / max over steps of
`time/generate_s`, `time/sync_s`, `time/update_s`, `sync_bytes` and `generate_tokens_per_s`, excluding step 1
(warm-up). On a CPU host the trainer and the server share the cores: server mode's times include that
contention and the HTTP and loopback-TCP costs, which a GPU layout (separate devices) does not have.
Appends one record to bench/results/server_mode-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO, append_record, new_record, results_path, summarize  # noqa: E402


def _overrides(cache: str, out: Path, url: str, steps: int) -> list[str]:
    return [f"run.output_dir={out}", f"run.cache_dir={cache}", "run.stages=[grpo]", f"grpo.max_steps={steps}",
            "grpo.prompts_per_step=8", "grpo.rollout.num_generations=8", "grpo.rollout.max_prompt_length=96",
            "grpo.rollout.max_completion_length=64", "grpo.tokens_per_micro_batch=2048", "grpo.lr=1e-3",
            "heldout.num_problems=8", "heldout.max_new_tokens=24", "grpo.reward.reward_workers=1",
            "grpo.reward.rewards=[accuracy,format,cosine,length]", "grpo.rollout.vllm_enforce_eager=true",
            f"grpo.rollout.server_urls=[{url}]", "grpo.rollout.server_start_timeout_s=300"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(overrides: list[str]) -> list[dict]:
    out = Path(next(o for o in overrides if o.startswith("run.output_dir=")).split("=", 1)[1])
    done = subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"), *overrides], capture_output=True,
                          text=True, env=_env(), timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"train.py failed: {done.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]


def _row(mode: str, lines: list[dict]) -> dict:
    steady = lines[1:] or lines
    row = {"mode": mode, "steps": len(lines), "steps_summarized": len(steady)}
    for key, name in (("time/generate_s", "generate_s"), ("time/sync_s", "sync_s"), ("time/update_s", "update_s"),
                      ("sync_bytes", "sync_bytes"), ("generate_tokens_per_s", "generate_tokens_per_s"),
                      ("completion_tokens", "completion_tokens")):
        values = [r[key] for r in steady if r.get(key) is not None]
        row[name] = summarize(values) if values else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cache", default="", help="embedded-assets cache (default: fastmath's)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_server_mode_"))
    url = f"http://127.0.0.1:{_free_port()}"
    record = new_record("server_mode", "cpu", steps=args.steps,
                        run="embedded model, 1 training process, 8 prompts x 8 completions x <= 64 tokens per step")

    record["results"].append(_row("colocate", _run([*_overrides(args.cache, work / "colocate", url, args.steps),
                                                    "grpo.rollout.generator=vllm"])))
    server = subprocess.Popen([sys.executable, "-m", "fastmath.serve",
                               *_overrides(args.cache, work / "unused", url, args.steps)],
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        record["results"].append(_row("server", _run([*_overrides(args.cache, work / "server", url, args.steps),
                                                      "grpo.rollout.vllm_mode=server"])))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    path = append_record(record, results_path("server_mode", record["device"]))
    print(json.dumps(record["results"], indent=1))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
