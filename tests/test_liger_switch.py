"""`model.liger`: whether the trainer's models get Liger-Kernel's RMSNorm / SwiGLU / RoPE (fastmath/model.py's
`use_liger`, applied by `load_causal_lm` through kernels.hf.apply_liger).

Liger's kernels are Triton on CUDA; on CPU this file checks the decision and its error messages, and that a
model loaded with the switch on carries Liger's modules (by pretending the decision, as tests/test_hf_packed.py
pretends a CUDA model for `kernels.hf.patch`). Numbers are not compared: Liger's RMSNorm kernel does not run in
Triton's interpreter (liger-kernel 0.8.5, Triton 3.9: "'float' object has no attribute 'to'").
"""
import copy

import pytest
import torch

import kernels.hf
from fastmath import model as fm_model
from fastmath.config import load_config
from fastmath.errors import ConfigError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
MISSING = "liger_kernel does not import (No module named 'liger_kernel')"


@pytest.mark.parametrize(
    "setting,device,problem,expected",
    [("never", CUDA, None, False), ("never", CPU, MISSING, False), ("auto", CUDA, None, True),
     ("auto", CPU, None, False), ("auto", CUDA, MISSING, False), ("always", CUDA, None, True)],
)  # fmt: skip
def test_use_liger_decision(setting, device, problem, expected, monkeypatch):
    monkeypatch.setattr(kernels.hf, "liger_import_problem", lambda: problem)
    assert fm_model.use_liger(setting, device) is expected


@pytest.mark.parametrize(
    "device,problem,message",
    [(CPU, None, "model.liger=always, but the device is cpu, and Liger's kernels run on CUDA only"),
     (CUDA, MISSING, f"model.liger=always, but {MISSING}")],
)  # fmt: skip
def test_always_refuses_what_cannot_run(device, problem, message, monkeypatch):
    monkeypatch.setattr(kernels.hf, "liger_import_problem", lambda: problem)
    with pytest.raises(ConfigError) as err:
        fm_model.use_liger("always", device)
    assert str(err.value) == f"{message}; set model.liger=auto or never"


def test_always_fails_before_loading(tmp_path):
    """The decision comes first: no model is read (the folder does not exist) before the refusal."""
    with pytest.raises(ConfigError, match="model.liger=always, but the device is cpu"):
        fm_model.load_causal_lm(str(tmp_path / "absent"), "sdpa", liger="always", device=CPU)


def test_config_field():
    assert load_config(None).model.liger == "auto"
    assert load_config(None, ["model.liger=always"]).model.liger == "always"
    with pytest.raises(ConfigError, match="model.liger"):
        load_config(None, ["model.liger=on"])


def _tiny_qwen2(folder):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    Qwen2ForCausalLM._from_config(copy.deepcopy(config)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("setting", ["auto", "never"])
def test_load_applies_liger_when_decided(setting, tmp_path, monkeypatch):
    """With the decision pretended true (a CUDA device with Liger installed), the loaded model's norms, MLPs
    and RoPE are Liger's, and its loss is still fastmath's; `never` leaves PyTorch's modules."""
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen2 import modeling_qwen2

    # Liger swaps module-level names for the whole architecture: restore them after the test.
    original_rope = modeling_qwen2.apply_rotary_pos_emb
    for attr in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, attr, getattr(modeling_qwen2, attr))
    monkeypatch.setattr(kernels.hf, "liger_import_problem", lambda: None)
    device = CUDA if setting == "auto" else CPU
    model = fm_model.load_causal_lm(str(_tiny_qwen2(tmp_path / "m")), "sdpa", liger=setting, device=device)
    liger = setting == "auto"
    assert (model.model.norm._get_name() == "LigerRMSNorm") is liger
    assert (model.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP") is liger
    assert (modeling_qwen2.apply_rotary_pos_emb is not original_rope) is liger
    assert "forward" not in vars(model)  # Liger's loss is not applied: fastmath's fused loss takes it
    assert next(model.parameters()).device == CPU  # moved or sharded onto the GPU later, by parallelize
