"""bench/toy_seeds.py's bookkeeping: seeds parsed, the spread over seeds, the README table, the capability probe."""
import pytest

from tests.conftest import REPO  # noqa: F401  (puts the repository on sys.path)

from bench import toy_seeds


def row(seed, sft, grpo, tokens_before, tokens_after):
    return {"seed": seed, "seconds": 600.0 + seed, "command": "...", "sft_steps": 10, "sft_val_loss": 0.03,
            "sft_accuracy": sft, "sft_tokens": tokens_before, "grpo_steps": 40, "grpo_before_accuracy": sft,
            "grpo_before_tokens": tokens_before, "grpo_accuracy": grpo, "grpo_tokens": tokens_after,
            "token_cut": 1 - tokens_after / tokens_before, "accuracy_change": grpo - sft}


def test_seeds_are_parsed_or_refused_by_name():
    assert toy_seeds.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(SystemExit, match="comma-separated integers"):
        toy_seeds.parse_seeds("0,a")
    with pytest.raises(SystemExit, match="no seed"):
        toy_seeds.parse_seeds(" , ")


def test_spread_is_mean_min_max_over_seeds_and_skips_the_seed_itself():
    rows = [row(0, 0.90, 0.91, 60.0, 40.0), row(1, 0.96, 0.94, 50.0, 40.0), row(2, 0.93, 0.93, 55.0, 44.0)]
    s = toy_seeds.spread(rows)
    assert "seed" not in s and "command" not in s
    assert s["sft_accuracy"]["mean"] == pytest.approx(0.93) and s["sft_accuracy"]["min"] == 0.90
    assert s["sft_accuracy"]["max"] == 0.96 and s["sft_accuracy"]["n"] == 3
    assert s["token_cut"]["max"] == pytest.approx(1 / 3)


def test_markdown_reports_mean_and_range_per_record():
    rows = [row(0, 0.90, 0.91, 60.0, 40.0), row(1, 0.96, 0.94, 50.0, 40.0)]
    record = {"summary": toy_seeds.spread(rows), "results": rows, "capability": "avx2", "capability_used": "AVX2",
              "device": "CPU: test", "git_commit": "abcdef123", "heldout_problems": 200}
    sft_only = dict(record, summary=toy_seeds.spread([{k: r[k] for k in list(r)[:7]} for r in rows]))
    table = toy_seeds.markdown([record, sft_only]).splitlines()
    assert "| avx2 (AVX2) | 0,1 | 93.0% (90.0-96.0) |" in table[2]
    assert "26.7% (20.0-33.3)" in table[2]  # the token cut, mean of 1/3 and 1/5
    assert table[3].endswith("| - | - | - | - | 10.0 (10.0-10.0) |")  # SFT only: no GRPO columns
    assert "greedy" in table[-1] and "200 test problems" in table[-1]


def test_capability_probe_reports_what_torch_uses():
    assert toy_seeds.effective_capability("default") == "DEFAULT"
