"""The token scheduler (fastmath/token_scheduler.py): the budget rule, its records, that the tiny ModernBERT learns a
length that depends on the problem, and the loop eval -> records -> train -> eval with per-problem budgets."""
import json
import math

import pytest

from fastmath.config import load_config
from fastmath.errors import ConfigError, DataError
from fastmath.token_scheduler import (BudgetRule, TokenScheduler, main, read_records, split_records,
                                      train_scheduler)


def test_budget_rule():
    rule = BudgetRule(margin_ratio=0.5, margin_tokens=4, min_budget=8)
    assert rule.budget(10.0, 128) == math.ceil(10 * 1.5 + 4) == 19
    assert rule.budget(10.2, 128) == 20           # rounded up: a budget is whole tokens
    assert rule.budget(0.0, 128) == 8             # at least min_budget
    assert rule.budget(-3.0, 128) == 8            # a negative prediction is 0 tokens
    assert rule.budget(500.0, 128) == 128         # at most the largest fixed budget
    assert rule.budget(1.0, 4) == 4               # min_budget never exceeds the cap
    with pytest.raises(ConfigError, match="scheduler.margin_ratio"):
        load_config(None, ["scheduler.margin_ratio=-0.1"])


def test_split_is_seeded_and_keeps_a_train_record():
    records = [{"problem": str(i), "mean_tokens": i} for i in range(20)]
    train, held = split_records(records, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert split_records(records, 0.1, seed=3) == (train, held)
    assert split_records(records, 0.1, seed=4) != (train, held)
    assert len(split_records(records[:2], 0.9, seed=0)[0]) == 1


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1 is not JSON"),
    ('{"problem": "x"}', "line 1 is not a token record"),
    ('{"problem": "x", "mean_tokens": -1}', "line 1 is not a token record"),
    ('{"problem": "x", "mean_tokens": true}', "line 1 is not a token record"),
])
def test_bad_records_are_named(tmp_path, line, message):
    path = tmp_path / "token_records.jsonl"
    path.write_text(line + "\n" + json.dumps({"problem": "y", "mean_tokens": 3}) + "\n")
    with pytest.raises(DataError, match=message):
        read_records(path)


@pytest.fixture
def one_thread():
    """A model this small trains faster on one thread than on two (no thread hand-offs per tiny matmul)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _family_records(assets, n=240):
    """Embedded train problems labelled by family: word problems 20 tokens, linear 40, arithmetic 70."""
    lengths = {"word": 20.0, "linear": 40.0, "arithmetic": 70.0}
    rows = [json.loads(line) for line in (assets.data_dir / "train.jsonl").read_text().splitlines()[:n]]
    return [{"problem": r["problem"], "mean_tokens": lengths[r["family"]]} for r in rows]


def test_tiny_scheduler_learns_a_length_that_depends_on_the_problem(tmp_path, assets, one_thread):
    """On held-out problems it beats predicting the mean length by far: it read the problem."""
    settings = load_config(None, ["scheduler.epochs=12", "scheduler.val_fraction=0.2"]).scheduler
    report = train_scheduler(_family_records(assets), settings, seed=0, policy_model=str(assets.model_dir),
                             out_dir=tmp_path / "sched")
    assert report["held_out"] == 48
    assert report["held_out_mae_tokens"] < 0.3 * report["held_out_mae_of_the_mean_tokens"], report
    scheduler = TokenScheduler(tmp_path / "sched", BudgetRule(0.25, 0, 1))
    word = "Tom has 12 apples and buys 7 more, then gives away 5. How many apples does Tom have now?"
    (p_word, b_word), (p_arith, b_arith) = scheduler.budgets([word, "What is 47 + 38 - 6?"], 64)
    assert p_word < p_arith and b_word < b_arith <= 64


def test_eval_records_train_a_scheduler_that_eval_uses(tmp_path, assets, embedded_cache, dist_info, capsys):
    """eval writes token_records.jsonl; `train` turns it into a scheduler; eval with eval.token_scheduler reports a
    `sched` row whose budgets are the rule's, derived from the same samples."""
    from fastmath.eval import run_eval

    common = [f"run.output_dir={tmp_path / 'run'}", f"run.cache_dir={embedded_cache}", "run.stages=[eval]",
              "eval.model=embedded", "eval.generator=hf", "eval.samples=2", "eval.budgets=[6,12]",
              "eval.max_problems=8", "eval.answer_workers=1"]
    first = run_eval(load_config(None, common), dist_info)
    assert first["scheduled"] is None
    records = read_records(tmp_path / "run" / "eval")
    assert len(records) == 8 and all(len(r["tokens"]) == 2 and r["budget"] == 12 for r in records)
    assert main(["train", "--records", str(tmp_path / "run" / "eval"), "--out", str(tmp_path / "sched"),
                 "scheduler.epochs=2", "scheduler.val_fraction=0.25"]) == 0
    capsys.readouterr()
    rule = ["scheduler.margin_ratio=0.0", "scheduler.margin_tokens=3", "scheduler.min_budget=2"]
    scheduled_run = [*common, "eval.output=eval_sched", f"eval.token_scheduler={tmp_path / 'sched'}", *rule]
    second = run_eval(load_config(None, scheduled_run), dist_info)
    sched = second["scheduled"]
    assert sched["budget"] == "scheduled" and sched["samples"] == 16
    assert " sched | " in (tmp_path / "run" / "eval_sched" / "table.md").read_text()
    predicted = TokenScheduler(tmp_path / "sched").predict_tokens(
        [r["problem"] for r in read_records(tmp_path / "run" / "eval_sched")])
    budgets = [max(2, min(12, math.ceil(p + 3))) for p in predicted]
    assert sched["mean_budget"] == pytest.approx(sum(budgets) / len(budgets))
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval_sched" / "samples.jsonl").read_text().splitlines()]
    scheduled = [r for r in rows if r["scheduled"]]
    assert len(scheduled) == 16 and all(r["tokens"] <= budgets[r["problem"]] for r in scheduled)
    assert main(["predict", "--scheduler", str(tmp_path / "sched"), "--problems", str(assets.data_dir / "test.jsonl"),
                 "--max-budget", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [json.loads(line) for line in out if line.startswith("{\"problem\"")]
    assert len(lines) == 200, out[:3]
    assert lines and all(1 <= row["budget"] <= 16 for row in lines)


def test_a_folder_that_is_not_a_scheduler_is_named(tmp_path):
    from fastmath.preflight import preflight

    with pytest.raises(DataError, match="is not a trained token scheduler"):
        TokenScheduler(tmp_path)
    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "run.stages=[eval]",
                                f"eval.token_scheduler={tmp_path}"])
    with pytest.raises(DataError, match="eval.token_scheduler .* is not a trained token scheduler"):
        preflight(config)
