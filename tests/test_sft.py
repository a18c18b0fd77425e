"""The SFT trainer end to end on the embedded default: packing, accumulation, resume, 2 processes, errors."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastmath.config import load_config
from fastmath.data import Formatter, load_documents
from fastmath.errors import CheckpointError, ModelError
from fastmath.model import CausalLMWithLinearLoss, load_causal_lm, load_tokenizer
from fastmath.packing import collate_packed
from fastmath.sft import accumulate_gradients, run_sft
from fastmath.stage import lr_at
from tests.conftest import REPO, subprocess_env
from tests.tolerances import (adam_divergence, decoder_rtol, decoder_width, reduction_atol, reduction_rtol,
                              storage_rtol)


def _docs(assets, tokenizer, n):
    docs, _ = load_documents(str(assets.data_dir / "train.jsonl"), "train", Formatter(tokenizer), max_rows=n)
    return [(d.input_ids, d.loss_mask) for d in docs]


def _tiny_run(tmp_path, embedded_cache, name, *overrides):
    return [f"run.output_dir={tmp_path / name}", f"run.cache_dir={embedded_cache}", "data.max_rows=96",
            "sft.tokens_per_micro_batch=512", "data.max_length=256", "sft.global_batch=2", "sft.epochs=1",
            "sft.lr=2e-3", "sft.warmup_ratio=0.2", "heldout.num_problems=0", "sft.log_every=1", *overrides]


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


def test_packed_row_loss_and_grads_equal_documents_alone(assets, tokenizer):
    """No token attends across documents: the packed loss equals the per-document losses (SDPA, alone)."""
    docs = _docs(assets, tokenizer, 3)
    torch.manual_seed(0)
    # float64: an identity, checked where rounding (bounded by decoder_rtol) cannot hide a cross-document leak.
    packed_model = CausalLMWithLinearLoss(load_causal_lm(str(assets.model_dir), "fastmath_varlen").double())
    alone_model = load_causal_lm(str(assets.model_dir), "sdpa").double()
    packed_loss = packed_model(collate_packed(docs))
    packed_loss.backward()

    alone_loss = 0.0
    for ids, mask in docs:
        logits = alone_model(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
        alone_loss = alone_loss + F.cross_entropy(logits, targets, reduction="sum")
    alone_loss.backward()
    config = alone_model.config
    tol = decoder_rtol(torch.float64, decoder_width(config, sum(len(ids) for ids, _ in docs)), config.num_hidden_layers)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=tol, atol=0.0)
    packed_grads = dict(packed_model.causal_lm.named_parameters())
    for name, param in alone_model.named_parameters():
        torch.testing.assert_close(packed_grads[name].grad, param.grad, rtol=0.0,
                                   atol=2 * tol * param.grad.abs().max().item(), msg=name)


def test_token_normalised_accumulation(assets, tokenizer):
    """One micro-batch of ~2k tokens gives the same gradient as the same documents in two of ~1k."""
    docs = _docs(assets, tokenizer, 40)
    half = len(docs) // 2
    whole, first, second = collate_packed(docs), collate_packed(docs[:half]), collate_packed(docs[half:])
    assert first.num_loss_tokens != second.num_loss_tokens  # otherwise mean-of-means would also pass
    n_tokens = whole.num_loss_tokens

    def grads(batches):  # float64: an identity (one sum vs two partial sums), free of fp32 summation order
        torch.manual_seed(0)
        model = CausalLMWithLinearLoss(load_causal_lm(str(assets.model_dir), "fastmath_varlen").double())
        no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
        loss = accumulate_gradients(model, batches, n_tokens, 1, torch.device("cpu"), no_autocast)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_one, grads_one = grads([whole])
    loss_two, grads_two = grads([first, second])
    config = load_causal_lm(str(assets.model_dir), "sdpa").config
    tol = decoder_rtol(torch.float64, decoder_width(config, whole.num_tokens), config.num_hidden_layers)
    torch.testing.assert_close(loss_one, loss_two, rtol=tol, atol=0.0)
    for name in grads_one:
        scale = grads_one[name].abs().max().item()
        torch.testing.assert_close(grads_one[name], grads_two[name], rtol=0.0, atol=2 * tol * scale, msg=name)


def test_lr_schedule_shape():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(100)]
    exact = reduction_rtol(torch.float64, 4)  # a few float64 operations (python floats)
    assert lrs[0] == pytest.approx(0.1, rel=exact) and lrs[9] == pytest.approx(1.0, rel=exact)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # The last step sits one step short of the cosine's end: floor + (1 - floor) (1 + cos(pi 89/90)) / 2.
    last = 0.1 + 0.9 * (1 + math.cos(math.pi * 89 / 90)) / 2
    assert lrs[-1] == pytest.approx(last, rel=exact) and lrs[-1] - 0.1 < 1e-3


def test_resume_reproduces_the_uninterrupted_run(tmp_path, embedded_cache, dist_info):
    full = load_config(None, _tiny_run(tmp_path, embedded_cache, "full", "sft.max_steps=6", "sft.save_every=3",
                                       "checkpoint.keep=5", "data.validation="))
    summary = run_sft(full, dist_info)
    assert summary["steps"] == 6
    reference = _losses(tmp_path / "full" / "metrics.jsonl")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    # A run that stopped right after its step-3 checkpoint, then restarts with resume=auto.
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", crashed / "checkpoints" / "step_00000003")
    (crashed / "checkpoints" / "step_00000006.tmp").mkdir()  # a save that died midway is ignored
    resumed = load_config(None, _tiny_run(tmp_path, embedded_cache, "crashed", "sft.max_steps=6",
                                          "sft.save_every=3", "data.validation="))
    run_sft(resumed, dist_info)
    again = _losses(crashed / "metrics.jsonl")
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):  # the same arithmetic on the same machine from the same state: bit for bit
        assert again[step] == reference[step], step

    # A resumed run with a different data order is refused, naming the key.
    changed = load_config(None, _tiny_run(tmp_path, embedded_cache, "crashed", "sft.max_steps=6",
                                          "data.validation=", "run.seed=1"))
    with pytest.raises(CheckpointError, match="run.seed"):
        run_sft(changed, dist_info)


def test_lm_head_chunk_budget_reaches_both_stages_kernels(tmp_path, embedded_cache, dist_info, monkeypatch):
    """model.lm_head_chunk_mib is the kernels' chunk_bytes in the SFT loss and in both GRPO wrappers (policy and
    reference); 0 leaves the kernels their default."""
    import fastmath.model
    from fastmath.grpo_stage import build_policy

    seen = []
    real = fastmath.model.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunk_bytes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastmath.model, "fused_linear_cross_entropy", spy)
    for mib, expected in ((3, 3 * 2**20), (0, None)):
        seen.clear()
        config = load_config(None, _tiny_run(tmp_path, embedded_cache, f"mib{mib}", "sft.max_steps=1",
                                             "data.validation=", f"model.lm_head_chunk_mib={mib}"))
        run_sft(config, dist_info)
        assert seen and set(seen) == {expected}
        config = load_config(None, [*_tiny_run(tmp_path, embedded_cache, f"grpo{mib}"), "grpo.loss.beta=0.1",
                                    f"model.lm_head_chunk_mib={mib}"])
        policy = build_policy(config, str(tmp_path / f"mib{mib}" / "hf"), dist_info)
        assert policy.model.chunk_bytes == policy.ref_model.chunk_bytes == expected


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, embedded_cache, dist_info):
    config = load_config(None, _tiny_run(tmp_path, embedded_cache, "run", "sft.max_steps=2", "data.validation="))
    run_sft(config, dist_info)
    step_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
    for shard in (step_dir / "model_and_optim").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="is corrupt"):
        run_sft(config, dist_info)


def test_missing_model_path(tmp_path, embedded_cache, dist_info):
    config = load_config(None, _tiny_run(tmp_path, embedded_cache, "run", f"model.name_or_path={tmp_path}/nope"))
    with pytest.raises(ModelError, match="model path not found"):
        run_sft(config, dist_info)


def test_two_processes_match_one(tmp_path, embedded_cache):
    """torchrun with 2 CPU processes (FSDP2, gloo) follows the 1-process loss trajectory at the same global batch."""
    losses = {}

    def run(nproc, name, *extra):
        overrides = _tiny_run(tmp_path, embedded_cache, name, "sft.max_steps=4", "data.validation=", *extra)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "fastmath" / "train.py"), *overrides]
        result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return _losses(tmp_path / name / "metrics.jsonl"), result.stdout

    losses[1], _ = run(1, "np1")
    losses[2], _ = run(2, "np2", "sft.save_every=2", "checkpoint.keep=2")
    assert sorted(losses[1]) == sorted(losses[2]) == [1, 2, 3, 4]
    # Resume at another world size: the 2-process checkpoint of step 2, continued by 1 process (DCP reshards).
    losses["2->1"], stdout = run(1, "np2to1", f"run.resume={tmp_path / 'np2' / 'checkpoints' / 'step_00000002'}")
    assert "resuming a checkpoint of 2 processes on 1" in stdout
    assert sorted(losses["2->1"]) == [3, 4]
    # Step 1 runs the same weights on both: only the sharded sums' order differs (decoder_rtol over the
    # 512-token rows), and a wrong normalisation across ranks would move it by a ratio of token counts. Later
    # steps start from weights Adam may have moved apart (adam_divergence below); their losses get the step-1
    # bound times the step number: an allowance for that drift, not a proven bound.
    config = load_causal_lm(str(tmp_path / "np1" / "hf"), "sdpa").config
    tol = decoder_rtol(torch.float32, decoder_width(config, 512), config.num_hidden_layers)
    for step in losses[1]:
        assert losses[2][step] == pytest.approx(losses[1][step], rel=tol * step, abs=0)
    for step in losses["2->1"]:
        assert losses["2->1"][step] == pytest.approx(losses[1][step], rel=tol * step, abs=0)
    # The 2-process export loads in plain transformers and gives the same weights as the 1-process one, up to
    # how far 4 AdamW steps at lr 2e-3 can drift apart from rounding alone.
    one = load_causal_lm(str(tmp_path / "np1" / "hf"), "sdpa").state_dict()
    two = load_causal_lm(str(tmp_path / "np2" / "hf"), "sdpa").state_dict()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0.0, atol=adam_divergence(2e-3, 4), msg=name)


def test_final_logit_softcap_reaches_the_fused_loss():
    """Gemma-2-style models cap their logits; the trainer's loss must equal the model's own capped logits' loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from kernels.hf import ATTENTION_NAME, register

    register()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM._from_config(config, attn_implementation=ATTENTION_NAME, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # raw logits well past the cap of 2
    ids = list(range(3, 15))
    batch = collate_packed([(ids, [False] * 4 + [True] * 8)])
    wrapper = CausalLMWithLinearLoss(model)
    ours = wrapper(batch)
    # Two fp32 evaluations of the capped LM head (the decoder before it is shared): a log-sum-exp over 64
    # logits of size <= 2 per token, then the sum over 8 tokens; each term at most |lse| + 2.
    tol = reduction_atol(torch.float32, 64, 8 * (2.0 + math.log(64) + 2.0), chain=3)
    wrapper.softcap = None  # the same loss without the cap must differ by more than that, or this proves nothing
    assert (wrapper(batch) - ours).abs() > 100 * tol
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    assert logits.abs().max() <= 2.0  # the cap is active in the model's own logits
    expected = F.cross_entropy(logits, batch.targets[0, :-1], reduction="sum")
    torch.testing.assert_close(ours, expected, rtol=0.0, atol=tol)


def test_bf16_autocast_step_runs_and_matches_fp32(assets, tokenizer):
    """The CUDA recipe (fp32 master weights, bf16 autocast) on CPU: RoPE hands fp32 q/k and bf16 v to the
    attention and the loss sees fp32 hidden states; both must cope and stay close to the fp32 loss."""
    batch = collate_packed(_docs(assets, tokenizer, 6))
    model = CausalLMWithLinearLoss(load_causal_lm(str(assets.model_dir), "fastmath_varlen"))
    fp32 = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(batch)
    bf16.backward()
    assert bf16.dtype == torch.float32
    # Autocast rounds every matmul's inputs to bf16 once (relative u_bf16 each) along the decoder's chain.
    config = model.causal_lm.config
    chain = 9 * config.num_hidden_layers + 2
    torch.testing.assert_close(bf16, fp32, rtol=2 * chain * storage_rtol(torch.bfloat16), atol=0.0)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_export_is_written_from_shards_in_the_named_dtype(tmp_path, embedded_cache, dist_info):
    """model.export_dtype=bf16 writes bf16 safetensors (split into several files with an index when they exceed the
    file size) that plain transformers loads with the trained values, rounded once."""
    from fastmath.checkpoint import export_hf

    config = load_config(None, _tiny_run(tmp_path, embedded_cache, "run", "sft.max_steps=1", "data.validation="))
    run_sft(config, dist_info)
    trained = load_causal_lm(str(tmp_path / "run" / "hf"), "sdpa")
    tokenizer = load_tokenizer(str(tmp_path / "run" / "hf"))
    out = export_hf(trained, tokenizer, tmp_path / "bf16", dist_info, torch.bfloat16, shard_bytes=2**20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_causal_lm(str(out), "sdpa", dtype=torch.bfloat16)
    assert again.config.tie_word_embeddings and "lm_head.weight" not in index["weight_map"]
    for name, tensor in again.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, trained.state_dict()[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
