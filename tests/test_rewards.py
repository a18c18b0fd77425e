"""Rewards: format, cosine, Kimi length, overlong, and their weighted sum (the answer check: test_answers.py)."""
import math
import time

import pytest

from fastmath.rewards import (compute_rewards, cosine_reward, cosine_value, format_ok, kimi_length_reward,
                              overlong_reward)


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


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_format_check_of_hostile_text_does_not_hang(n):
    # As for extraction (test_answers.py): the old check took minutes at 100k characters and grew as n^2;
    # a linear one needs well under a second at 1M, and the loose bound only catches a hang.
    hostile = ["<think> x </think> " + "\\boxed{" * (n // 7), "<think>" * (n // 7), "<think> " + "{" * n,
               "<think> x </think>" + "}" * n]
    started = time.monotonic()
    assert not any(format_ok(text) for text in hostile)
    assert time.monotonic() - started < 10 * len(hostile) * n / 1_000_000


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
