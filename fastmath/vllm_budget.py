"""The GPU memory of one colocated vLLM engine, term by term, as vLLM 0.32 sizes it at start-up.

vLLM's worker (`Worker.determine_available_memory`, with `memory_profiling` and `request_memory`) computes,
per GPU of the engine:

    budget        = gpu_memory_utilization x total GPU memory       (it also refuses to start when the GPU's
                                                                     free memory at that moment is below this)
    kv_available  = budget - weights - activation peak - non-torch memory - CUDA-graph memory

    weights       the model's parameters on this GPU: sharded linear layers and the vocabulary / TP, norms whole
    activations   the torch peak of one dummy forward of max_num_batched_tokens tokens (and of one dummy
                  sampler pass over max_num_seqs rows), measured by vLLM; APPROXIMATED here from the
                  architecture (below)
    overhead      memory outside torch's allocator that the engine adds (NCCL buffers, cuBLAS workspaces) plus
                  the CUDA graphs it captures (estimated by vLLM since 0.21 unless enforce_eager); ASSUMED here
                  (defaults below), since only a run measures them
    KV cache      what is left, in blocks; one token of one sequence takes
                  2 (K and V) x layers x kv_heads / TP x head_dim x dtype bytes

The activation approximation: the forward's peak is inside one decoder layer (layers run one at a time), at
the MLP: the hidden state and the residual (2 x hidden), the gate/up output (2 x intermediate / TP) and the
activated half (intermediate / TP), per token, in the model dtype. The dummy sampler pass holds fp32 logits
over the whole vocabulary for max_num_seqs rows, about three copies (logits, probabilities, log-probs). vLLM
keeps the larger of the two. The engine's log line "Available KV cache memory: X GiB" is the measured value
to compare against on a GPU.

`kv_needed` is the worst case of the sequences in flight: every sequence at its full length, no prefix
sharing (the G completions of one prompt do share its prompt's blocks under prefix caching: a small credit at
512-token prompts and 16k-token completions). When kv_needed exceeds kv_available, vLLM does not fail: it
preempts sequences and recomputes them later, which costs time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GiB = 2**30
VOCAB_PADDING = 64            # vLLM pads the vocabulary rows to a multiple of this (per tensor-parallel rank)
NON_TORCH_BYTES = 1 * GiB     # assumed: NCCL / cuBLAS / allocator memory the engine adds outside torch
CUDA_GRAPH_BYTES = 1 * GiB    # assumed: captured CUDA graphs (0 with enforce_eager)
SAMPLER_COPIES = 3            # fp32 logits, probabilities and log-probs of the dummy sampler pass


@dataclass(frozen=True)
class EngineBudget:
    """Bytes per GPU of one engine, by term; tokens of KV cache."""

    budget: int               # gpu_memory_utilization x GPU bytes
    weights: int
    activations: int
    overhead: int
    kv_available: int         # budget - weights - activations - overhead (negative: the engine cannot start)
    kv_needed: int            # every sequence in flight at its full length
    kv_bytes_per_token: int   # on one GPU of the engine
    kv_tokens: int            # tokens of KV the available bytes hold
    kv_tokens_needed: int
    max_model_len: int

    @property
    def fits(self) -> bool:
        """The engine starts (room for one sequence of max_model_len) and holds every sequence in flight."""
        return self.kv_tokens >= max(self.max_model_len, self.kv_tokens_needed)

    @property
    def starts(self) -> bool:
        """vLLM refuses to start when the KV cache cannot hold one sequence of max_model_len tokens."""
        return self.kv_tokens >= self.max_model_len

    def as_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits, "starts": self.starts}


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _shape(config) -> dict:
    c = _text_config(config)
    heads = c.num_attention_heads
    return {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
            "intermediate": c.intermediate_size, "vocab": c.vocab_size,
            "tied": bool(getattr(c, "tie_word_embeddings", False)),
            # Qwen2's q/k/v projections carry a bias (its config has no flag for it); others say so in the config.
            "qkv_bias": bool(getattr(c, "attention_bias", c.model_type == "qwen2")),
            "qk_norm": c.model_type in ("qwen3", "qwen3_moe")}


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def weight_bytes(config, tensor_parallel_size: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of the model's parameters on one GPU of a tensor-parallel group (dense decoder, gated MLP)."""
    s, tp = _shape(config), tensor_parallel_size
    h, d, layers = s["hidden"], s["head_dim"], s["layers"]
    kv_per_rank = max(1, s["kv_heads"] // tp)  # KV heads are replicated when there are fewer than TP ranks
    q_cols, kv_cols = s["heads"] * d // tp, kv_per_rank * d
    attention = h * (q_cols + 2 * kv_cols) + q_cols * h          # q, k, v in; o out
    if s["qkv_bias"]:
        attention += q_cols + 2 * kv_cols
    mlp = 3 * h * s["intermediate"] // tp                          # gate, up, down
    norms = 2 * h + (2 * d if s["qk_norm"] else 0)                 # replicated on every rank
    vocab_rows = _ceil_to(s["vocab"], VOCAB_PADDING * tp) // tp
    embeddings = vocab_rows * h * (1 if s["tied"] else 2)          # embedding and (untied) LM head
    params = layers * (attention + mlp + norms) + h + embeddings   # + the final norm
    return params * dtype_bytes


def activation_bytes(config, tensor_parallel_size: int = 1, dtype_bytes: int = 2,
                     max_num_batched_tokens: int = 4096, max_num_seqs: int = 256) -> int:
    """Approximate torch peak of vLLM's profiling run (see the module docstring)."""
    s, tp = _shape(config), tensor_parallel_size
    forward = max_num_batched_tokens * dtype_bytes * (2 * s["hidden"] + 3 * s["intermediate"] // tp)
    sampler = max_num_seqs * s["vocab"] * 4 * SAMPLER_COPIES
    return max(forward, sampler)


def kv_bytes_per_token(config, tensor_parallel_size: int = 1, dtype_bytes: int = 2) -> int:
    """2 (K and V) x layers x KV heads on this GPU x head_dim x dtype bytes."""
    s = _shape(config)
    return 2 * s["layers"] * max(1, s["kv_heads"] // tensor_parallel_size) * s["head_dim"] * dtype_bytes


def engine_budget(config, gpu_bytes: int, gpu_memory_utilization: float, tensor_parallel_size: int,
                  max_model_len: int, sequences: int, sequence_tokens: int, *, dtype_bytes: int = 2,
                  max_num_batched_tokens: int = 4096, max_num_seqs: int = 256, enforce_eager: bool = False,
                  non_torch_bytes: int = NON_TORCH_BYTES, cuda_graph_bytes: int = CUDA_GRAPH_BYTES) -> EngineBudget:
    """One GPU's share of a vLLM engine for an HF `PretrainedConfig`.

    gpu_bytes: the GPU's total memory; sequences / sequence_tokens: how many sequences the engine holds at once
    and the length of each (prompt + completion); the rest as vLLM's options of the same names."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if tensor_parallel_size < 1 or _shape(config)["heads"] % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} does not divide the "
                         f"{_shape(config)['heads']} attention heads")
    budget = int(gpu_memory_utilization * gpu_bytes)
    weights = weight_bytes(config, tensor_parallel_size, dtype_bytes)
    activations = activation_bytes(config, tensor_parallel_size, dtype_bytes, max_num_batched_tokens, max_num_seqs)
    overhead = non_torch_bytes + (0 if enforce_eager else cuda_graph_bytes)
    kv_available = budget - weights - activations - overhead
    per_token = kv_bytes_per_token(config, tensor_parallel_size, dtype_bytes)
    tokens_needed = sequences * sequence_tokens
    return EngineBudget(budget=budget, weights=weights, activations=activations, overhead=overhead,
                        kv_available=kv_available, kv_needed=tokens_needed * per_token, kv_bytes_per_token=per_token,
                        kv_tokens=max(0, kv_available) // per_token, kv_tokens_needed=tokens_needed,
                        max_model_len=max_model_len)
