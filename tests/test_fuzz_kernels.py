"""A fixed-seed subset of the kernel fuzzer (bench/fuzz_kernels.py): the first cases of its recorded run, with
the same case generator and the same comparison, and checks that the comparison catches a wrong kernel.

The recorded run (>= 1,000 cases per function) is `bench/fuzz_kernels.py`; its counts are in docs/reliability.md.
"""
import json
import os
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
import fuzz_kernels  # noqa: E402

# The fuzz cases are CPU tensors: they take the Triton path only under the interpreter.
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="the fuzz cases are CPU tensors, run by Triton's interpreter (make test's interpreted "
                              "pass)"),
]

SEED = 0  # the recorded run's seed: these are its first cases
CASES = {"varlen_attention": 8, "fused_linear_grpo_loss": 10}  # the slowest under the interpreter
DEFAULT_CASES = 12


@pytest.mark.parametrize("function", list(fuzz_kernels.FUZZERS))
def test_fixed_seed_cases_pass(function):
    failures = []
    for index in range(CASES.get(function, DEFAULT_CASES)):
        params = fuzz_kernels.draw_case(function, SEED, index)
        problems = fuzz_kernels.check_case(function, params)
        if problems:
            failures.append(f"#{index} {json.dumps(params)}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)


def test_the_draw_covers_both_dtypes_and_is_replayable():
    """Each function's first cases use fp32 and fp16; a case is its JSON parameters, drawn identically again."""
    for function in fuzz_kernels.FUZZERS:
        cases = [fuzz_kernels.draw_case(function, SEED, i) for i in range(DEFAULT_CASES)]
        assert {c["dtype"] for c in cases} == set(fuzz_kernels.DTYPES), function
        assert json.loads(json.dumps(cases)) == cases
        assert cases == [fuzz_kernels.draw_case(function, SEED, i) for i in range(DEFAULT_CASES)]


def _wrong_labels(real):
    def wrong(hidden, weight, labels, **kw):  # an off-by-one row index on the Triton path only
        return real(hidden, weight, labels.roll(1) if kw["backend"] == "triton" else labels, **kw)
    return wrong


def _wrong_advantages(real):
    def wrong(logprobs, **kw):  # a 1% scale error on the Triton path only
        if kw["backend"] == "triton":
            kw = {**kw, "advantages": kw["advantages"] * 1.01}
        return real(logprobs, **kw)
    return wrong


def _wrong_scale(real):
    def wrong(q, k, v, *args, softmax_scale=None, backend, **kw):  # a 1% softmax-scale error
        if backend == "triton":
            softmax_scale = (softmax_scale or q.shape[-1] ** -0.5) * 1.01
        return real(q, k, v, *args, softmax_scale=softmax_scale, backend=backend, **kw)
    return wrong


@pytest.mark.parametrize("function,name,mutation", [
    ("fused_linear_cross_entropy", "fused_linear_cross_entropy", _wrong_labels),
    ("grpo_loss", "grpo_loss", _wrong_advantages),
    ("varlen_attention", "varlen_attention", _wrong_scale),
])
def test_a_wrong_kernel_fails_the_comparison(monkeypatch, function, name, mutation):
    """The bound is tight enough to catch an index error or a 1% scale error in most cases (not all: a case with
    one row, all labels ignored, no masked token or 1-key documents has nothing for the error to change). In
    fp32 a 0.1% error is caught as well; in fp16 it is within two roundings of the result."""
    monkeypatch.setattr(fuzz_kernels, name, mutation(getattr(fuzz_kernels, name)))
    n = CASES.get(function, DEFAULT_CASES)
    caught = sum(bool(fuzz_kernels.check_case(function, fuzz_kernels.draw_case(function, SEED, i))) for i in range(n))
    assert caught >= n // 2, f"only {caught} of {n} cases caught the wrong kernel"


def test_the_script_writes_a_record_and_replays_it(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    assert fuzz_kernels.main(["--functions", "grpo_loss,group_advantages", "--cases-per-function", "3",
                              "--out", str(out)]) == 0
    record = common.load_records(out)[-1]
    assert common.check_record(record) == []
    assert record["cases"] == 6 and record["failed_cases"] == 0 and record["complete"]
    assert [r["function"] for r in record["results"]] == ["grpo_loss", "group_advantages"]
    assert record["cpu_capability"] and record["versions"]["triton"]
    record["failures"] = [{"function": "grpo_loss", "params": fuzz_kernels.draw_case("grpo_loss", 0, 1)}]
    out.write_text(json.dumps([record]))
    assert fuzz_kernels.main(["--replay", str(out)]) == 0
    assert "1 cases replayed, 0 failing" in capsys.readouterr().out
