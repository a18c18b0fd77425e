"""README's demo block: built from the records whose runs have the demo's current setting, and nothing else."""
import json

import pytest

from bench.experiments import demo_setting, demo_summary
from tests.conftest import REPO


def test_readme_demo_block_is_the_generators_output_of_the_committed_records():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count(demo_summary.BEGIN) == 1 and readme.count(demo_summary.END) == 1
    block = readme.split(demo_summary.BEGIN)[1].split(demo_summary.END)[0].strip()
    assert block == demo_summary.markdown()


def test_a_verbose_train_file_is_the_embedded_data_at_that_fraction_and_plumbing_is_left_out():
    base = {"run": {"seed": 3, "output_dir": "/x"}, "data": {"train": "embedded", "embedded_verbose_fraction": 0.8},
            "sft": {"epochs": 15}, "grpo": {"generator": "hf", "vllm_enforce_eager": True, "max_steps": 40}}
    as_file = json.loads(json.dumps(base))
    as_file["data"] = {"train": "/w/train-verbose0.8.jsonl", "embedded_verbose_fraction": 0.5}
    setting = demo_setting.setting_of(as_file)
    assert setting == demo_setting.setting_of(base) == {
        "data.embedded_verbose_fraction": 0.8, "data.train": "embedded", "grpo.max_steps": 40, "sft.epochs": 15}


def test_renamed_keys_are_read_under_their_new_name(monkeypatch):
    monkeypatch.setitem(demo_setting.RENAMED, "sft.old_name", "sft.new_name")
    assert demo_setting.setting_of({"sft": {"old_name": 1}}) == {"sft.new_name": 1}


def test_settings_match_on_the_keys_both_have_and_a_record_without_one_never_matches():
    reference = {"sft.epochs": 15, "sft.global_batch": 2, "grpo.max_steps": 40}
    assert demo_setting.is_demo({"sft.epochs": 15, "grpo.max_steps": 40}, reference)
    assert demo_setting.differences({"sft.epochs": 8, "sft.global_batch": 2}, reference) == {"sft.epochs": (8, 15)}
    assert not demo_setting.is_demo({"sft.epochs": 8}, reference)
    assert not demo_setting.is_demo(None, reference) and not demo_setting.is_demo({}, reference)


def _batch(date, capability, setting, cut=0.32, change=-0.005):
    row = {"seed": 0, "setting": setting, "sft_accuracy": 0.99, "grpo_accuracy": 0.985, "token_cut": cut,
           "accuracy_change": change}
    return {"date": date, "part": "demo", "capability_used": capability, "results": [row, dict(row, seed=1)]}


def test_the_newest_batch_of_the_demos_setting_per_arithmetic_is_kept(tmp_path):
    demo, other = {"sft.epochs": 15}, {"sft.epochs": 8}
    (tmp_path / "toy_levers-cpu.json").write_text(json.dumps([
        _batch("2026-12-01", "AVX2", demo, cut=0.31), _batch("2026-12-03", "AVX2", demo, cut=0.33),
        _batch("2026-12-04", "AVX2", other), _batch("2026-12-02", "DEFAULT", demo),
        _batch("2026-12-05", "AVX512", None)]))
    batches = demo_summary.demo_batches(demo, tmp_path)
    assert [(b["capability_used"], b["date"]) for b in batches] == [("AVX2", "2026-12-03"), ("DEFAULT", "2026-12-02")]
    assert demo_summary.demo_timing(demo, tmp_path) is None


@pytest.mark.parametrize("cut, change, sft, expected", [
    (0.30, -0.01, 0.94, "yes"), (0.299, 0.0, 0.99, "no"), (0.35, -0.0101, 0.99, "no"), (0.35, 0.0, 0.93, "no")])
def test_the_verdict_is_the_issues_pair_seed_averaged(cut, change, sft, expected):
    rows = [{"token_cut": cut, "accuracy_change": change, "sft_accuracy": sft}] * 3
    assert demo_summary.verdict(rows) == expected


def test_a_setting_is_rebuilt_at_a_commit_with_that_commits_own_loader():
    import subprocess

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    rebuilt = demo_setting.setting_at_commit(
        head, "fastmath/train.py --config configs/demo.yaml run.seed=4 run.output_dir=x sft.epochs=3")
    committed = subprocess.run(["git", "-C", str(REPO), "show", f"{head}:configs/demo.yaml"], capture_output=True,
                               text=True, check=True).stdout
    assert rebuilt["sft.epochs"] == 3
    assert "run.seed" not in rebuilt and rebuilt["model.name_or_path"] == "embedded"
    assert f"\n  max_steps: {rebuilt['grpo.max_steps']}" in committed
