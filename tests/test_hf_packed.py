"""kernels/hf.py: a packed row through a tiny HF model equals each document run alone with SDPA (eager for
Gemma 2's soft-capping), on the reference path and, once, on the Triton path.

The Triton test carries the `triton` marker: it needs Triton's interpreter on from the start (or a GPU), which
the second pytest pass of `make test` provides (see tests/conftest.py).
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import create_causal_mask  # noqa: E402

import kernels.attention  # noqa: E402
import kernels.hf  # noqa: E402
from kernels.hf import ATTENTION_NAME  # noqa: E402
from tests.closeness import assert_close  # noqa: E402
from tests.tolerances import reduction_rtol  # noqa: E402

LENGTHS = [5, 1, 9]
VOCAB = 128
# name: (config class, model class, extra config, attention of the documents-alone run)
MODELS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}, "sdpa"),
    "llama": (LlamaConfig, LlamaForCausalLM, {}, "sdpa"),
    # a 4-token window (shorter than the 9-token document) on the second layer
    "qwen2_sliding": (
        Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "sdpa"
    ),
    # soft-capped logits, a 3-token window on the first layer; SDPA has no soft-capping, eager has
    "gemma2": (
        Gemma2Config, Gemma2ForCausalLM, dict(head_dim=16, sliding_window=3, attn_logit_softcapping=5.0), "eager"
    ),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    kernels.hf.register()
    kernels.hf.register()  # idempotent


def model_rtol(dtype, config):
    """Two evaluations of the same decoder that sum in different orders (packed vs alone, other kernels) differ,
    relative to the largest output, by at most the bound of tests/tolerances.py over the widest reduction (the
    MLP's intermediate size, the vocabulary, or the row) through the chain of reductions: per layer RMSNorm,
    q/k/v, scores, softmax, P @ V, o_proj, RMSNorm, gate/up, down (9), then the final norm and the LM head.
    `config` is the reference model's: transformers' eager attention takes its softmax in fp32 whatever the
    dtype, so a float64 comparison against it is an fp32 one."""
    width = max(config.hidden_size, config.intermediate_size, config.vocab_size, sum(LENGTHS))
    if config._attn_implementation == "eager":
        dtype = torch.float32
    return reduction_rtol(dtype, width, chain=9 * config.num_hidden_layers + 2)


def tiny_models(name, dtype=torch.float64):
    """The same random weights twice: one model on packed attention, one on SDPA / eager (separate configs).
    float64 by default: packing must not change the math, an identity checked where rounding cannot hide a
    leak; the Triton path (fp32 at most) passes dtype=torch.float32."""
    config_cls, model_cls, extra, alone = MODELS[name]
    config = config_cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    packed = model_cls._from_config(copy.deepcopy(config), attn_implementation=ATTENTION_NAME, dtype=dtype)
    reference = model_cls._from_config(copy.deepcopy(config), attn_implementation=alone, dtype=dtype)
    reference.load_state_dict(packed.state_dict())
    assert packed.config._attn_implementation == ATTENTION_NAME and reference.config._attn_implementation == alone
    return packed, reference


def packed_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (sum(LENGTHS),), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, position_ids, cu


def doc_loss(logits, ids):
    """Mean next-token loss of one document (0 for a one-token document)."""
    if ids.shape[0] < 2:
        return logits.sum() * 0
    return F.cross_entropy(logits[:-1], ids[1:])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_packed(model, ids, position_ids, cu, with_cu_seqlens):
    model.zero_grad()
    kwargs = {}
    if with_cu_seqlens:
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    logits = model(input_ids=ids[None], position_ids=position_ids[None], **kwargs).logits[0]
    bounds = cu.tolist()
    sum(doc_loss(logits[s:e], ids[s:e]) for s, e in zip(bounds[:-1], bounds[1:])).backward()
    return logits.detach(), grads(model)


def run_alone(model, ids, cu):
    model.zero_grad()
    bounds, logits, total = cu.tolist(), [], 0
    for s, e in zip(bounds[:-1], bounds[1:]):
        doc_logits = model(input_ids=ids[s:e][None]).logits[0]
        total = total + doc_loss(doc_logits, ids[s:e])
        logits.append(doc_logits.detach())
    total.backward()
    return torch.cat(logits), grads(model)


def check_packed_row_equals_documents_alone(name, with_cu_seqlens, dtype=torch.float64):
    packed_model, sdpa_model = tiny_models(name, dtype)
    ids, position_ids, cu = packed_batch()
    logits, packed_grads = run_packed(packed_model, ids, position_ids, cu, with_cu_seqlens)
    ref_logits, ref_grads = run_alone(sdpa_model, ids, cu)
    tol = model_rtol(dtype, sdpa_model.config)
    assert_close(logits, ref_logits, atol=tol * ref_logits.abs().max().item(), rtol=0.0, name="logits")
    assert packed_grads.keys() == ref_grads.keys()
    for param in ref_grads:
        # The backward doubles the chain: the same reductions again, in reverse.
        scale = ref_grads[param].abs().max().item()
        assert_close(packed_grads[param], ref_grads[param], atol=2 * tol * scale, rtol=0.0, name=f"grad {param}")


@pytest.mark.parametrize("with_cu_seqlens", [True, False], ids=["cu_seq_lens", "position_ids_only"])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_row_equals_documents_alone(name, with_cu_seqlens, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the reference path, even in an interpreted process
    check_packed_row_equals_documents_alone(name, with_cu_seqlens)


@pytest.mark.triton
@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_triton_packed_row_equals_documents_alone(name, monkeypatch):
    """The same equivalence with the attention on the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # "auto" takes the Triton path for CPU tensors
    launches = []
    real_forward = kernels.attention._forward
    monkeypatch.setattr(kernels.attention, "_forward", lambda *a: launches.append(1) or real_forward(*a))
    check_packed_row_equals_documents_alone(name, with_cu_seqlens=True, dtype=torch.float32)
    assert len(launches) == 2  # one per layer: the Triton path ran


def test_position_ids_derived_once_per_forward(monkeypatch):
    packed_model, _ = tiny_models("qwen2")
    ids, position_ids, cu = packed_batch()
    derived = []
    real = kernels.hf._derive_layout
    monkeypatch.setattr(kernels.hf, "_derive_layout", lambda *a: derived.append(real(*a)) or derived[-1])
    packed_model(input_ids=ids[None], position_ids=position_ids[None])
    assert len(derived) == 1  # two layers, one derivation
    cu_q, _, max_q, _ = derived[0]
    assert cu_q.tolist() == cu.tolist() and max_q == max(LENGTHS)


@pytest.mark.parametrize("name", list(MODELS))
def test_unpacked_batch_one_document_per_row(name):
    packed_model, sdpa_model = tiny_models(name)
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = packed_model(input_ids=x).logits, sdpa_model(input_ids=x).logits
    tol = model_rtol(torch.float64, sdpa_model.config)
    assert_close(ours, ref, atol=tol * ref.abs().max().item(), rtol=0.0, name="logits")


def test_padding_mask_and_generation():
    """Left padding takes the unpad path; greedy decoding (queries shorter than keys) matches SDPA."""
    packed_model, sdpa_model = tiny_models("qwen2")
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        ours = packed_model(input_ids=x, attention_mask=mask).logits
        ref = sdpa_model(input_ids=x, attention_mask=mask).logits
    tol = model_rtol(torch.float64, sdpa_model.config) * ref[mask.bool()].abs().max().item()
    assert_close(ours[mask.bool()], ref[mask.bool()], atol=tol, rtol=0.0, name="padded logits")
    assert torch.isfinite(ours).all()  # padding rows give zeros into o_proj, no NaN
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(packed_model.generate(x, **settings), sdpa_model.generate(x, **settings))


def test_mask_function_builds_no_dense_mask():
    packed_model, _ = tiny_models("qwen2")
    _, position_ids, _ = packed_batch()
    embeds = torch.zeros(1, position_ids.shape[0], 64)
    config = packed_model.config
    assert create_causal_mask(config, embeds, None, None, position_ids=position_ids[None]) is None
    ones = torch.ones(1, position_ids.shape[0], dtype=torch.long)
    assert create_causal_mask(config, embeds, ones, None, position_ids=position_ids[None]) is None
    padded = ones.clone()
    padded[0, 0] = 0
    mask = create_causal_mask(config, embeds, padded, None, position_ids=position_ids[None])
    assert mask.shape == (1, position_ids.shape[0])  # the 2-D padding mask, not T x T


def test_errors():
    packed_model, _ = tiny_models("qwen2")
    ids, position_ids, cu = packed_batch()
    two_rows = torch.stack([ids, ids])
    with pytest.raises(ValueError, match="batch size must be 1"):
        packed_model(input_ids=two_rows, position_ids=position_ids.expand(2, -1), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="patch"):
        kernels.hf.patch(Qwen2ForCausalLM)


def test_patch_switches_an_instantiated_model(caplog):
    _, sdpa_model = tiny_models("llama")
    with caplog.at_level(logging.INFO, logger="kernels.hf"):
        assert kernels.hf.patch(sdpa_model) is sdpa_model
    assert sdpa_model.config._attn_implementation == ATTENTION_NAME
    # A CPU model keeps PyTorch's RMSNorm / MLP: Liger's kernels need CUDA.
    assert sdpa_model.model.norm._get_name() == "LlamaRMSNorm" and "Liger-Kernel skipped" in caplog.text


def test_patch_applies_liger_to_cuda_models(monkeypatch):
    """On CUDA, patch() swaps in Liger's RMSNorm / SwiGLU / RoPE (checked on CPU by pretending; not run)."""
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen2 import modeling_qwen2

    # Liger also swaps module-level names for the whole architecture: restore them after the test.
    original_rope = modeling_qwen2.apply_rotary_pos_emb
    for attr in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, attr, getattr(modeling_qwen2, attr))
    monkeypatch.setattr(kernels.hf, "_is_cuda_model", lambda model: True)
    model, _ = tiny_models("qwen2")
    kernels.hf.patch(model)
    assert model.model.norm._get_name() == "LigerRMSNorm"
    assert model.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    assert modeling_qwen2.apply_rotary_pos_emb is not original_rope
    assert type(model).forward is Qwen2ForCausalLM.forward and "forward" not in vars(model)  # no Liger loss
