"""Rewards: the answer check (math-verify in a worker pool, timeouts), format, cosine, Kimi length, overlong."""
import math
import signal
import time

import pytest

from fastmath.rewards import (AnswerChecker, compute_rewards, cosine_reward, cosine_value, format_ok,
                              kimi_length_reward, overlong_reward)


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(workers=2, timeout_s=3.0) as c:
        yield c


# Real answer formats: (completion, gold, expected correctness).
CASES = [
    ("<think> 3/4 </think> \\boxed{\\frac{3}{4}}", "3/4", True),
    ("<think> x </think> \\boxed{0.75}", "\\frac{3}{4}", True),
    ("\\boxed{\\dfrac{6}{8}}", "3/4", True),
    ("\\boxed{-\\frac{1}{2}}", "-1/2", True),
    ("\\boxed{1/2}", "-1/2", False),
    ("\\boxed{[1, 2)}", "[1,2)", True),
    ("\\boxed{(1, 2)}", "[1,2)", False),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
    ("first \\boxed{5} then \\boxed{7}", "7", True),   # the last box counts
    ("first \\boxed{7} then \\boxed{5}", "7", False),
    ("\\boxed{1000}", "1,000", True),
    ("\\boxed{12}", "13", False),
]


def test_answer_formats(checker):
    verdicts = checker.check([c for c, _, _ in CASES], [g for _, g, _ in CASES])
    got = [v.correct for v in verdicts]
    assert got == [e for _, _, e in CASES], [(c, g, v) for (c, g, _), v in zip(CASES, verdicts)]


def test_adversarial_completions_do_not_hang(checker):
    hostile = [
        "no box at all",
        "\\boxed{",                                  # never closes
        "\\boxed{}",
        "\\boxed{" + "{" * 5000 + "}",               # unbalanced nesting
        "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
        "\\boxed{\\frac{\\frac{\\frac{1}{2}}{3}}{" + "x" * 2000 + "}}",
        "\\boxed{9^{9^{9^{9^{9}}}}}",               # a number too big to evaluate
        "\\boxed{" + "1+" * 4000 + "1}",
    ]
    started = time.monotonic()
    verdicts = checker.check(hostile, ["1"] * len(hostile))
    assert time.monotonic() - started < 60
    assert [v.correct for v in verdicts[:3]] == [False, False, False]
    assert all(v.correct is not True for v in verdicts[3:])
    assert {v.status for v in verdicts} <= {"no_answer", "wrong", "timeout", "error"}


def _spin(item):  # pure Python: the in-worker alarm interrupts it
    while True:
        pass


def _blocked(item):  # signals blocked, sleeping: only the watchdog can end this one
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(3600)


def test_item_timeout_counts_and_watchdog_restarts_the_pool():
    with AnswerChecker(workers=1, timeout_s=0.5) as c:
        c._start()
        # Our alarm handler is installed by the worker initializer: a spinning item ends as a timeout.
        from fastmath import rewards

        assert c._map(rewards._timed_call, [(0.5, _spin, 1)], None) == ["timeout"]
        assert c.restarts == 0
        started = time.monotonic()
        out = c._map(_blocked, [1], "gave up")
        assert out == ["gave up"] and c.restarts == 1
        assert time.monotonic() - started < 10
        # The pool was replaced and still works.
        assert c.check(["\\boxed{2}"], ["2"])[0].correct is True


def test_gold_answers_that_do_not_parse_are_flagged(checker):
    assert checker.gold_parses(["3/4", "[1,2)", "", "\\frac{1}{2}"]) == [True, True, False, True]


def test_format():
    assert format_ok("<think> a+b=3 </think> \\boxed{3}")
    assert format_ok("  <think>\nline\n</think>\nSo \\boxed{\\frac{1}{2}}.")
    assert not format_ok("<think> a </think>")                         # no box
    assert not format_ok("\\boxed{3}")                                  # no think block
    assert not format_ok("<think> \\boxed{3} </think>")                 # box only inside the thinking
    assert not format_ok("<think> a </think> <think> b </think> \\boxed{3}")
    assert not format_ok("<think> a <think> b </think> \\boxed{3}")
    assert not format_ok("x <think> a </think> \\boxed{3}")             # text before the think block
    assert not format_ok("<think> a </think> \\boxed{3")                # unbalanced box


def test_cosine_end_points_and_monotonicity():
    assert cosine_value(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_value(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine_value(50, 100, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_value(500, 100, 1.0, 0.1) == pytest.approx(0.1)  # beyond the max: the end value
    got = cosine_reward(None, None, None, correct=[True, True, False, False], length=[0, 100, 0, 100],
                        max_length=100)
    assert got == pytest.approx([1.0, 0.1, -1.0, -0.1])
    lengths = list(range(0, 101, 10))
    right = cosine_reward(None, None, None, correct=[True] * 11, length=lengths, max_length=100)
    wrong = cosine_reward(None, None, None, correct=[False] * 11, length=lengths, max_length=100)
    assert all(a > b for a, b in zip(right, right[1:]))  # shorter correct answers earn more
    assert all(a < b for a, b in zip(wrong, wrong[1:]))  # longer wrong answers are punished less


def test_kimi_length_reward_by_hand():
    # Group 0: lengths 10, 20, 30 -> lambda 0.5, 0, -0.5; group 1: one length -> 0.
    got = kimi_length_reward(None, None, None, correct=[True, False, True, True, False],
                             length=[10, 20, 30, 7, 7], group=[0, 0, 0, 1, 1])
    assert got == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0])
    # A short wrong answer is not rewarded (min(0, lambda)).
    assert kimi_length_reward(None, None, None, correct=[False, True], length=[10, 30], group=[0, 0]) == \
        pytest.approx([0.0, -0.5])


def test_overlong_shaping():
    got = overlong_reward(None, None, None, tokens=[50, 80, 90, 100, 120], limit=100, overlong_buffer=20)
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_compute_rewards_weights_and_a_failing_reward(monkeypatch):
    from fastmath import rewards

    def broken(prompts, completions, answers, **columns):
        raise RuntimeError("boom")

    monkeypatch.setitem(rewards.REWARDS, "broken", broken)
    columns = {"correct": [True, False], "length": [10, 10], "group": [0, 0], "truncated": [False, False]}
    table = compute_rewards(["accuracy", "format", "broken"], [2.0, 0.5, 1.0], ["p", "p"],
                            ["<think> a </think> \\boxed{1}", "nope"], ["1", "1"], columns, {})
    assert table.components["accuracy"] == [1.0, 0.0]
    assert table.components["format"] == [1.0, 0.0]
    assert table.components["broken"] == [0.0, 0.0]
    assert table.total == pytest.approx([2.5, 0.0])
    assert "boom" in table.failures["broken"]


def test_a_reward_returning_nan_is_a_failure(monkeypatch):
    from fastmath import rewards

    monkeypatch.setitem(rewards.REWARDS, "nan", lambda *a, **k: [math.nan])
    table = compute_rewards(["nan"], [1.0], ["p"], ["c"], ["1"], {"correct": [False]}, {})
    assert table.total == [0.0] and "non-finite" in table.failures["nan"]
