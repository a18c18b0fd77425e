"""The seed's recipe, exactly: the shipped configs against the README's Fidelity table (fastmath/fidelity.py), and
the settings that table relies on: schedule horizons past the stop, the cosine reward in characters, fixed-count
micro-batches, the paged 8-bit optimizer's refusal off CUDA, the benchmark split. The bnpo normaliser against
TRL's own code is in tests/test_grpo_trl.py."""
import json
import math

import pytest
import torch

from fastmath.config import load_config
from fastmath.errors import ConfigError
from fastmath.eval import benchmark_split
from fastmath.fidelity import CONFIGS, ROWS, fidelity_markdown, recipe_rows
from fastmath.policy import Sequence, pack_sequences
from fastmath.rewards import cosine_reward
from fastmath.stage import build_optimizer, lr_at, optim_settings, schedule_length
from tests.conftest import REPO

EXACT = 4 * torch.finfo(torch.float64).eps  # one cosine and a few float64 operations


def _value(config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


@pytest.mark.parametrize("recipe", sorted(CONFIGS))
def test_shipped_config_matches_the_fidelity_table(recipe):
    config = load_config(REPO / CONFIGS[recipe])
    for row in recipe_rows(recipe):
        if row.key is None:
            continue
        ours = _value(config, row.key)
        numeric = isinstance(row.value, float) or (isinstance(row.value, list) and row.value
                                                   and all(isinstance(v, float) for v in row.value))
        expected = pytest.approx(row.value, rel=EXACT) if numeric else row.value
        assert ours == expected, f"{CONFIGS[recipe]}: {row.key} = {ours!r}, the Fidelity table says {row.value!r}"


def test_readme_holds_the_fidelity_table():
    assert fidelity_markdown() in (REPO / "README.md").read_text(encoding="utf-8"), \
        "README's Fidelity table is stale: paste fastmath.fidelity.fidelity_markdown() into it"


def test_every_row_names_a_recipe_and_a_real_key():
    config = load_config(None)
    for row in ROWS:
        assert row.recipe in CONFIGS
        if row.key is not None:
            _value(config, row.key)  # AttributeError for a key that does not exist
        else:
            assert row.why, f"{row.setting}: a setting fastmath does differently says why"


def test_sft_schedule_is_a_20_epoch_cosine_stopped_at_350():
    """schedule_epochs=20 with 35 steps per epoch is HF Trainer's 700-step cosine; the rate at step 350 is
    half the peak, whatever max_steps says."""
    config = load_config(REPO / CONFIGS["sft"])
    horizon = schedule_length(config.sft, run_steps=350, steps_per_epoch=35)
    assert horizon == 700
    for step in (0, 1, 175, 349, 350):
        want = 1e-5 * 0.5 * (1 + math.cos(math.pi * step / 700))
        assert lr_at(step, horizon, 1e-5, 0.0, 0.0) == pytest.approx(want, rel=EXACT)
    assert lr_at(350, horizon, 1e-5, 0.0, 0.0) == pytest.approx(0.5e-5, rel=EXACT)


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
    config = load_config(REPO / CONFIGS["grpo"]).grpo
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
        load_config(None, ["grpo.completions_per_micro_batch=2", "grpo.max_prompt_length=512",
                           "grpo.max_completion_length=2048", "grpo.tokens_per_micro_batch=4096"])


def test_paged_8bit_adamw_refuses_cpu_parameters():
    settings = optim_settings(load_config(None, ["optim.name=adamw_8bit"]), "sft")
    with pytest.raises(ConfigError, match="needs the model on CUDA.*parameters are on cpu.*optim.name=adamw"):
        build_optimizer(torch.nn.Linear(3, 2), settings)
    plain = build_optimizer(torch.nn.Linear(3, 2), optim_settings(load_config(None), "sft"))
    assert isinstance(plain, torch.optim.AdamW)


def test_paged_8bit_adamw_refuses_sharded_parameters(dist_info):
    """Under FSDP2 (several processes) parameters are DTensors, which bitsandbytes' kernels do not take."""
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(torch.nn.Linear(3, 2))
    settings = optim_settings(load_config(None, ["optim.name=adamw_8bit"]), "sft")
    with pytest.raises(ConfigError, match="cannot update FSDP-sharded parameters.*optim.name=adamw"):
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
        f"run.output_dir={out}", f"run.cache_dir={embedded_cache}", "run.stages=[grpo]", "grpo.generator=hf",
        "grpo.max_steps=2", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_rows=40",
        "grpo.max_prompt_length=96", "grpo.max_completion_length=24", "grpo.tokens_per_micro_batch=256",
        "grpo.loss_type=bnpo", "grpo.completions_per_micro_batch=2", "grpo.schedule_steps=-1", "grpo.lr=1e-3",
        "grpo.rewards=[format,cosine,length]", "grpo.format_rule=box_before_think_end", "grpo.length_unit=chars",
        "grpo.cosine_max_length=120", "grpo.beta=0.04", "grpo.vllm_is_correction=false", "grpo.reward_workers=1",
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
