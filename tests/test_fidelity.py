"""The seed's recipe, exactly: the shipped configs against docs/fidelity.md's Fidelity table (bench/fidelity.py), and
the settings that table relies on: schedule horizons past the stop, the cosine reward in characters, fixed-count
micro-batches, the paged 8-bit optimizer's refusal off CUDA, the benchmark split. The bnpo normaliser against
TRL's own code is in tests/test_grpo_trl.py."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from fastmath.config import load_config, setting
from fastmath.errors import ConfigError
from fastmath.eval import benchmark_split
from bench.fidelity import CONFIGS, ROWS, SEED_SFT_STEPS_PER_EPOCH, fidelity_markdown, recipe_rows
from fastmath.policy import Sequence, pack_sequences
from fastmath.rewards import cosine_reward
from fastmath.stage import build_optimizer, lr_at, optim_settings, schedule_length
from tests.conftest import REPO

EXACT = 4 * torch.finfo(torch.float64).eps  # one cosine and a few float64 operations


@pytest.mark.parametrize("recipe", sorted(CONFIGS))
def test_shipped_config_matches_the_fidelity_table(recipe):
    config = load_config(REPO / CONFIGS[recipe])
    for row in recipe_rows(recipe):
        if row.key is None:
            continue
        ours = setting(config, row.key)
        numeric = isinstance(row.value, float) or (isinstance(row.value, list) and row.value
                                                   and all(isinstance(v, float) for v in row.value))
        expected = pytest.approx(row.value, rel=EXACT) if numeric else row.value
        assert ours == expected, f"{CONFIGS[recipe]}: {row.key} = {ours!r}, the Fidelity table says {row.value!r}"


def test_readme_holds_the_fidelity_table():
    assert fidelity_markdown() in (REPO / "docs/fidelity.md").read_text(encoding="utf-8"), \
        "docs/fidelity.md's Fidelity table is stale: paste bench.fidelity.fidelity_markdown() into it"


def test_every_row_names_a_recipe_and_a_real_key():
    config = load_config(None)
    for row in ROWS:
        assert row.recipe in CONFIGS
        if row.key is not None:
            setting(config, row.key)  # AttributeError for a key that does not exist
        else:
            assert row.why, f"{row.setting}: a setting fastmath does differently says why"


def test_sft_schedule_is_a_20_epoch_cosine_stopped_at_350():
    """schedule_epochs=20 at the seed's 39 steps per epoch is HF Trainer's 780-step cosine; step 350 is then the end
    of epoch 9 (8.97 epochs) with the rate at 0.58 of its peak, whatever max_steps says (the config header and the
    Fidelity row say so)."""
    config = load_config(REPO / CONFIGS["sft"])
    horizon = schedule_length(config.sft, run_steps=350, steps_per_epoch=SEED_SFT_STEPS_PER_EPOCH)
    assert horizon == 780
    for step in (0, 1, 175, 349, 350):
        want = 1e-5 * 0.5 * (1 + math.cos(math.pi * step / 780))
        assert lr_at(step, horizon, 1e-5, 0.0, 0.0) == pytest.approx(want, rel=EXACT)
    epochs = 350 / SEED_SFT_STEPS_PER_EPOCH
    assert 8.9 < epochs < 9.0  # the last steps of epoch 9
    fraction = lr_at(350, horizon, 1e-5, 0.0, 0.0) / 1e-5
    assert round(fraction, 2) == 0.58
    text = (REPO / CONFIGS["sft"]).read_text(encoding="utf-8")
    assert "end of epoch 9" in text and "0.58 of its peak" in text
    assert "epoch 9" in next(r.seed for r in ROWS if r.recipe == "sft" and r.setting == "stop")


def test_grpo_schedule_spans_one_pass_over_the_prompts():
    """schedule_steps=-1: floor(rows / prompts_per_step), the seed's total_steps_per_device; at the stop (40 of
    200) the rate is still ~90% of its peak."""
    config = load_config(REPO / CONFIGS["grpo"])
    horizon = schedule_length(config.grpo, run_steps=40, prompt_rows=3215)
    assert horizon == 200
    for step in (0, 20, 39):
        want = 4e-6 * 0.5 * (1 + math.cos(math.pi * step / 200))
        assert lr_at(step, horizon, 4e-6, 0.0, 0.0) == pytest.approx(want, rel=EXACT)
    assert lr_at(39, horizon, 4e-6, 0.0, 0.0) > 0.9 * 4e-6
    run_length = load_config(None, ["grpo.max_steps=7"]).grpo
    assert schedule_length(run_length, run_steps=7, prompt_rows=3215) == 7  # 0: the stop, as before
    with pytest.raises(ConfigError, match="shorter than 'grpo.max_steps'"):
        load_config(None, ["grpo.max_steps=50", "grpo.schedule_steps=10"])
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["sft.schedule_steps=10", "sft.schedule_epochs=2"])


def test_warmup_counts_and_cosine_as_hf_trainer():
    """Warmup is ceil(warmup_ratio * schedule) steps (HF's `get_warmup_steps`); after it, the rate equals HF's own
    `get_cosine_schedule_with_warmup` step for step."""
    transformers = pytest.importorskip("transformers")
    total, ratio, peak = 130, 0.013, 1.0
    warmup = math.ceil(ratio * total)
    assert warmup == 2
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total):
        hf = scheduler.get_last_lr()[0]
        ours = lr_at(step, total, peak, ratio, 0.0)
        if step >= warmup:
            assert ours == pytest.approx(hf, rel=EXACT, abs=EXACT), step
        else:  # ours: (s + 1) / warmup, so no step runs at rate 0 (HF: s / warmup)
            assert ours == pytest.approx(peak * (step + 1) / warmup, rel=EXACT)
        optimizer.step()
        scheduler.step()


def test_sft_run_follows_its_schedule_horizon(tmp_path, embedded_cache, dist_info):
    """The SFT loop sets each step's rate from schedule_steps, not from where it stops."""
    from fastmath.sft import run_sft

    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"run.cache_dir={embedded_cache}",
                                "data.max_rows=48", "sft.tokens_per_micro_batch=512", "data.max_length=256",
                                "sft.global_batch=2", "sft.max_steps=3", "sft.schedule_steps=40",
                                "sft.warmup_ratio=0.05", "sft.lr=1e-3", "heldout.num_problems=0",
                                "data.validation="])
    run_sft(config, dist_info)
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "lr" in r]
    assert lrs == pytest.approx([lr_at(s, 40, 1e-3, 0.05, 0.0) for s in range(3)], rel=EXACT)
    assert lrs[-1] > 0.9e-3  # a 3-step schedule would have ended near 0


def _seed_cosine(chars: int, correct: bool) -> float:
    """finetune/grpo_rewards.py's cosine_scaled_reward with the stage-2 settings (max_len 30000, clip_len)."""
    progress = min(1.0, chars / 30000)
    low, high = (0.1, 1.0) if correct else (-0.1, -1.0)  # wrong: min_value = max_value_wrong, swapped
    return low + 0.5 * (high - low) * (1.0 + math.cos(progress * math.pi))


def test_cosine_reward_in_characters_is_the_seeds():
    config = load_config(REPO / CONFIGS["grpo"]).grpo.reward
    lengths = [0, 1, 9000, 27000, 29999, 30000, 45000]
    for correct in (True, False):
        ours = cosine_reward([], [], [], correct=[correct] * len(lengths), length=lengths,
                             max_length=config.cosine_max_length, cosine_correct=tuple(config.cosine_correct),
                             cosine_wrong=tuple(config.cosine_wrong))
        assert ours == pytest.approx([_seed_cosine(n, correct) for n in lengths], rel=EXACT, abs=EXACT)
    assert _seed_cosine(0, False) == pytest.approx(-1.0) and _seed_cosine(30000, False) == pytest.approx(-0.1)


def test_fixed_count_micro_batches_take_completions_in_length_order():
    seqs = [Sequence([1] * p, [2] * c, None, 0.0, True) for p, c in [(3, 9), (2, 1), (4, 4), (1, 2), (5, 6)]]
    rows = pack_sequences(seqs, budget=64, per_row=2)
    assert [b.num_sequences for b in rows] == [2, 2, 1]
    completion_lengths = [sorted(torch.bincount(b.seq_ids).tolist()) for b in rows]
    assert completion_lengths == [[1, 2], [4, 6], [9]]  # totals 3, 3 | 8, 11 | 12
    with pytest.raises(ConfigError, match="completions_per_micro_batch"):
        load_config(None, ["grpo.loss.completions_per_micro_batch=2", "grpo.rollout.max_prompt_length=512",
                           "grpo.rollout.max_completion_length=2048", "grpo.tokens_per_micro_batch=4096"])


def test_paged_8bit_adamw_refuses_cpu_parameters():
    settings = optim_settings(load_config(None, ["optim.name=paged_adamw_8bit"]), "sft")
    with pytest.raises(ConfigError, match="needs the model on CUDA.*parameters are on cpu.*optim.name=adamw_8bit"):
        build_optimizer(torch.nn.Linear(3, 2), settings)
    plain = build_optimizer(torch.nn.Linear(3, 2), optim_settings(load_config(None), "sft"))
    assert isinstance(plain, torch.optim.AdamW)


def test_paged_8bit_adamw_refuses_sharded_parameters(dist_info):
    """Under FSDP2 (several processes) parameters are DTensors, which bitsandbytes' kernels do not take."""
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(torch.nn.Linear(3, 2))
    settings = optim_settings(load_config(None, ["optim.name=paged_adamw_8bit"]), "sft")
    with pytest.raises(ConfigError, match="cannot update FSDP-sharded parameters.*optim.name=adamw_8bit"):
        build_optimizer(model, settings)


def test_seed_betas_reach_the_optimizer():
    settings = optim_settings(load_config(REPO / CONFIGS["sft"], ["optim.name=adamw"]), "sft")
    optimizer = build_optimizer(torch.nn.Linear(3, 2), settings)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_benchmark_split_auto(tmp_path):
    assert benchmark_split(load_config(None, ["eval.benchmark=embedded"])) == "test"
    local = tmp_path / "aime.jsonl"
    assert benchmark_split(load_config(None, [f"eval.benchmark={local}"])) == "test"
    assert benchmark_split(load_config(None, ["eval.benchmark_split=validation"])) == "validation"


def test_grpo_run_with_the_seeds_update_settings(tmp_path, embedded_cache, dist_info):
    """Two GRPO steps on the embedded default with stage 2's update settings: bnpo over micro-batches of exactly
    2 completions, the cosine over one pass of the prompts, the seed's rewards in characters."""
    from fastmath.grpo_stage import run_grpo

    out = tmp_path / "seed_grpo"
    config = load_config(None, [
        f"run.output_dir={out}", f"run.cache_dir={embedded_cache}", "run.stages=[grpo]", "grpo.rollout.generator=hf",
        "grpo.max_steps=2", "grpo.prompts_per_step=4", "grpo.rollout.num_generations=4", "grpo.max_rows=40",
        "grpo.rollout.max_prompt_length=96", "grpo.rollout.max_completion_length=24", "grpo.tokens_per_micro_batch=256",
        "grpo.loss.loss_type=bnpo", "grpo.loss.completions_per_micro_batch=2", "grpo.schedule_steps=-1", "grpo.lr=1e-3",
        "grpo.reward.rewards=[format,cosine,length]", "grpo.reward.format_rule=box_before_think_end",
        "grpo.reward.length_unit=chars",
        "grpo.reward.cosine_max_length=120", "grpo.loss.beta=0.04", "grpo.loss.vllm_is_correction=false",
        "grpo.reward.reward_workers=1",
        "heldout.num_problems=0"])
    run_grpo(config, dist_info)
    lines = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in lines)
    # 40 prompt rows / 4 per step: a 10-step cosine, stopped after 2
    assert [r["lr"] for r in lines] == pytest.approx([lr_at(s, 10, 1e-3, 0.0, 0.0) for s in range(2)], rel=EXACT)


def test_a_checkpoint_older_than_the_schedule_keys_resumes():
    """A checkpoint whose config predates sft.schedule_steps ran with its default (the run's own length)."""
    from fastmath.config import to_dict
    from fastmath.errors import CheckpointError
    from fastmath.stage import check_resume_compatible

    saved = to_dict(load_config(None))
    del saved["sft"]["schedule_steps"]
    keys = ("sft.schedule_steps", "sft.lr")
    check_resume_compatible(saved, load_config(None), REPO, keys)
    with pytest.raises(CheckpointError, match="sft.schedule_steps=0, this run has 40"):
        check_resume_compatible(saved, load_config(None, ["sft.schedule_steps=40"]), REPO, keys)


# ---------------------------------------------------------------------------------------------
# Seed-exact options: the length-reward span, the answer check, BOS, eos loss, top_k


def _seed_len_reward(lengths, correct):
    """finetune/grpo_rewards.py's len_reward: one min/max over every completion it is called with."""
    lo, hi = min(lengths), max(lengths)
    if lo == hi:
        return [0.0] * len(lengths)
    lams = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lams, correct)]


def test_length_span_rank_batch_is_the_seeds_len_reward():
    """Two prompts x 8 completions, as one seed rank scores them: rank_batch equals the seed's function exactly;
    group (Kimi's) differs as soon as the two groups' spans differ."""
    from fastmath.rewards import kimi_length_reward

    lengths = [120, 300, 95, 410, 220, 180, 260, 333, 40, 900, 610, 75, 512, 66, 801, 150]
    correct = [i % 3 != 0 for i in range(16)]
    group = [i // 8 for i in range(16)]
    ours = kimi_length_reward([], [], [], correct=correct, length=lengths, group=group, length_span="rank_batch")
    assert ours == pytest.approx(_seed_len_reward(lengths, correct), rel=EXACT, abs=EXACT)
    per_group = kimi_length_reward([], [], [], correct=correct, length=lengths, group=group, length_span="group")
    assert per_group[:8] == pytest.approx(_seed_len_reward(lengths[:8], correct[:8]), rel=EXACT, abs=EXACT)
    assert per_group != pytest.approx(ours)
    with pytest.raises(ConfigError, match="length_span"):
        load_config(None, ["grpo.reward.length_span=rank"])


def test_seed_answer_check_reads_the_whole_completion():
    """seed_parse accepts an unboxed final answer that last_box calls no answer; both accept a box; a wrong box
    stays wrong in both."""
    from fastmath.answers import AnswerChecker

    texts = ["<think>\n2 + 3 = 5\n</think>\nThe final answer is $5$.", "<think>\nso</think> \\boxed{5}",
             "<think>\nso</think> \\boxed{6}", "no answer at all"]
    golds = ["5"] * 4
    with AnswerChecker(1, 10.0, "seed_parse") as seed, AnswerChecker(1, 10.0) as last_box:
        assert [v.status for v in seed.check(texts, golds)] == ["correct", "correct", "wrong", "no_answer"]
        assert [v.status for v in last_box.check(texts, golds)] == ["no_answer", "correct", "wrong", "no_answer"]
    with pytest.raises(ConfigError, match="answer check mode"):
        AnswerChecker(1, 1.0, "first_box")


def test_bos_follows_the_tokenizers_config(assets):
    """R1-Distill's tokenizer config adds BOS (add_bos_token: true): with the seed's SFT template (no BOS in it)
    fastmath puts one before the prompt; with R1-Distill's own template (TRL's copy, which renders {{bos_token}})
    there is still exactly one; data.bos=never adds none; a tokenizer that adds none (Qwen's) gets none."""
    import trl

    from fastmath.data import Formatter, tokenizer_adds_bos
    from fastmath.model import load_tokenizer

    def r1_tokenizer():
        tok = load_tokenizer(str(assets.model_dir))
        tok.add_special_tokens({"bos_token": "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
                                "eos_token": "<\uff5cend\u2581of\u2581sentence\uff5c>",
                                "additional_special_tokens": ["<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]})
        tok.add_bos_token = True  # as R1-Distill's tokenizer_config.json says
        return tok

    plain = load_tokenizer(str(assets.model_dir))
    assert not tokenizer_adds_bos(plain)
    assert Formatter(plain).prompt_ids("1 + 1 = ?")[0] != plain.bos_token_id or plain.bos_token_id is None
    tok = r1_tokenizer()
    assert tokenizer_adds_bos(tok)
    bos = tok.bos_token_id
    seed_sft = Formatter(tok, chat_template="fast_math_r1_sft")
    ids = seed_sft.prompt_ids("1 + 1 = ?")
    assert ids[0] == bos and ids.count(bos) == 1
    assert Formatter(r1_tokenizer(), chat_template="fast_math_r1_sft", bos="never").prompt_ids("1 + 1 = ?")[0] != bos
    own = Formatter(r1_tokenizer(), chat_template=str(Path(trl.__file__).parent / "chat_templates" /
                                                      "deepseek_r1_distill.jinja"))
    ids = own.prompt_ids("1 + 1 = ?")
    assert ids[0] == bos and ids.count(bos) == 1


def test_mask_pad_tokens_is_the_seeds_collator(assets):
    """With pad = eos (R1-Distill), data.mask_pad_tokens takes the loss off every eos, and only off those."""
    from fastmath.data import DataReport, Formatter
    from fastmath.model import load_tokenizer

    tok = load_tokenizer(str(assets.model_dir))
    tok.pad_token = tok.eos_token
    row = {"problem": "1 + 1 = ?", "solution": "<think> 1+1=2 </think> \\boxed{2}"}
    trained = Formatter(tok, chat_template="fast_math_r1_sft").document(row, DataReport("x"))
    masked = Formatter(tok, chat_template="fast_math_r1_sft", mask_pad_tokens=True).document(row, DataReport("x"))
    assert trained.input_ids == masked.input_ids and trained.input_ids[-1] == tok.eos_token_id
    eos_at = [i for i, t in enumerate(trained.input_ids) if t == tok.eos_token_id]
    assert trained.loss_mask[-1] and not masked.loss_mask[-1]
    assert all(not masked.loss_mask[i] for i in eos_at)
    assert [m for i, m in enumerate(masked.loss_mask) if i not in eos_at] == \
        [m for i, m in enumerate(trained.loss_mask) if i not in eos_at]


def test_top_k_reaches_both_generators(assets):
    """top_k=1 sampling is greedy decoding in HF generate; vLLM's SamplingParams receive the configured top_k."""
    from fastmath.data import Formatter
    from fastmath.model import load_tokenizer
    from fastmath.rollout import HFGenerator, Sampling, VLLMGenerator

    assert load_config(REPO / CONFIGS["qwen3"]).grpo.rollout.top_k == 50
    tok = load_tokenizer(str(assets.model_dir))
    prompt = Formatter(tok).prompt_ids("12 + 34 = ?")
    hf = HFGenerator(str(assets.model_dir), tok, torch.device("cpu"), False, 8)
    greedy = hf.generate([prompt], Sampling(temperature=0.0, max_tokens=12), 1)[0][0].token_ids
    top1 = hf.generate([prompt], Sampling(temperature=1.0, top_k=1, max_tokens=12, seed=3), 4)[0]
    assert all(c.token_ids == greedy for c in top1)

    class Captured(Exception):
        pass

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm=False):
            raise Captured(params)

    vllm = pytest.importorskip("vllm", reason="vLLM is not installed here")
    engine = VLLMGenerator("model", max_model_len=64, seed=0, gpu_memory_utilization=0.1, cpu_kv_cache_gib=1,
                           engine=FakeLLM())
    with pytest.raises(Captured) as caught:
        engine.generate([prompt], Sampling(top_k=50), 2)
    assert isinstance(caught.value.args[0], vllm.SamplingParams) and caught.value.args[0].top_k == 50
    with pytest.raises(ConfigError, match="grpo.rollout.top_k"):
        load_config(None, ["grpo.rollout.top_k=-1"])


def test_8bit_adamw_steps_sharded_parameters_close_to_fp32_adamw(dist_info):
    """optim.name=adamw_8bit (torchao) updates FSDP2's DTensor parameters, and its first steps stay within the
    8-bit moments' quantisation error of fp32 AdamW: blockwise absmax scaling of 8-bit codes gives each moment a
    relative error of a few percent at most, so an update of size lr differs by at most ~lr * 0.1 per entry."""
    pytest.importorskip("torchao", reason="torchao is not installed (optim.name=adamw_8bit needs it)")
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64)
    results = {}
    for name in ("adamw", "adamw_8bit"):
        model = fully_shard(copy.deepcopy(base))
        optimizer = build_optimizer(model, optim_settings(load_config(None, [f"optim.name={name}"]), "sft"))
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(16, 128)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[name] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    lr = optim_settings(load_config(None), "sft").lr
    for n, exact in results["adamw"].items():
        moved = (exact - base.state_dict()[n]).abs().max().item()
        assert moved > lr  # the steps did move the weights
        torch.testing.assert_close(results["adamw_8bit"][n], exact, rtol=0, atol=3 * 0.1 * lr, msg=n)
