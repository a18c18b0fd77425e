"""bench/toy_levers.py: the verbose-fraction data keep the demo's problems, settings are named, the table."""
import json

import pytest

from bench import toy_levers
from tests.test_toy_seeds import row


def test_verbose_data_change_only_which_train_rows_carry_the_re_checks(tmp_path, embedded_cache, assets):
    overrides = toy_levers.verbose_data(tmp_path, 0.8, embedded_cache)
    assert overrides == [f"data.train={tmp_path / 'train-verbose0.8.jsonl'}"]
    rows = [json.loads(line) for line in (tmp_path / "train-verbose0.8.jsonl").read_text().splitlines()]
    embedded = [json.loads(line) for line in (assets.data_dir / "train.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in rows] == [r["uid"] for r in embedded]
    assert [r["answer"] for r in rows] == [r["answer"] for r in embedded]
    assert sum(r["style"] == "verbose" for r in rows) == round(0.8 * len(rows))
    assert sum(r["style"] == "verbose" for r in embedded) == round(0.5 * len(embedded))
    assert all((" ok " in r["solution"]) == (r["style"] == "verbose") for r in rows)  # every re-check ends "ok"


def test_settings_are_parsed_and_named():
    assert toy_levers.parse_sets(["grpo.lr=1e-4"]) == ["grpo.lr=1e-4"]
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        toy_levers.parse_sets(["grpo.lr"])
    assert toy_levers.setting_name({"overrides": [], "verbose_fraction": None}) == "the demo's"
    assert toy_levers.setting_name({"overrides": ["grpo.lr=1e-4"], "verbose_fraction": 0.8}) == (
        "SFT data 80% verbose, grpo.lr=1e-4")


def test_table_line_is_mean_and_range_over_the_settings_seeds():
    rows = [row(0, 0.90, 0.91, 60.0, 40.0), row(1, 0.96, 0.94, 50.0, 40.0)]
    record = {"overrides": ["grpo.max_steps=80"], "verbose_fraction": None, "results": rows, "capability": "native",
              "capability_used": "AVX2", "git_commit": "abcdef123"}
    line = toy_levers.markdown([record]).splitlines()[2]
    assert line.startswith("| grpo.max_steps=80 | 0,1 | native (AVX2) | 93.0% (90.0-96.0) | 55.0 (50.0-60.0) |")
    assert "| 26.7% (20.0-33.3) | -0.5 (-2.0-1.0) | abcdef1 |" in line


def finished_run(out, sft_heldout):
    (out / "grpo").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "summary.json").write_text(json.dumps(
        {"steps": 930, "after": {"val_loss": 0.04, "heldout": sft_heldout}}))
    (out / "grpo" / "summary.json").write_text(json.dumps(
        {"steps": 40, "before": {"heldout": {"accuracy": 0.97, "mean_tokens": 62.0}},
         "after": {"heldout": {"accuracy": 0.965, "mean_tokens": 43.4}}}))


def test_a_run_on_a_data_file_takes_its_sft_figures_from_grpos_check_of_the_same_export(tmp_path):
    finished_run(tmp_path / "seed0", None)
    row = toy_levers.collected_row(0, tmp_path, ("data.train=x.jsonl",))
    assert row["sft_heldout_from"] == "grpo before"
    assert (row["sft_accuracy"], row["sft_tokens"]) == (0.97, 62.0)
    assert row["token_cut"] == pytest.approx(1 - 43.4 / 62.0)
    assert row["command"].endswith("run.stages=[sft,grpo] data.train=x.jsonl") and row["seconds"] >= 0
    finished_run(tmp_path / "seed1", {"accuracy": 0.99, "mean_tokens": 50.0})
    row = toy_levers.collected_row(1, tmp_path, ())
    assert "sft_heldout_from" not in row and row["sft_accuracy"] == 0.99
    with pytest.raises(SystemExit, match="no finished run"):
        toy_levers.collected_row(2, tmp_path, ())
