"""The evaluation arithmetic on hand-made samples: pass@1 and its SE, majority vote with ties, budgets, truncation."""
import math

import pytest

from fastmath.eval_metrics import SampleResult, budget_metrics, majority_vote, pass_at_1


def S(problem, sample, correct, answer="x", budget=100, tokens=10, truncated=False):
    return SampleResult(problem, sample, budget, tokens, answer, correct, truncated)


def test_pass_at_1_and_standard_error_by_hand():
    # Three problems, k = 4: 4, 2 and 0 correct -> per-problem rates 1, 0.5, 0.
    samples = [S("a", j, True) for j in range(4)] + [S("b", j, j < 2) for j in range(4)] + \
              [S("c", j, False) for j in range(4)]
    (m,) = budget_metrics(samples)
    assert m.pass_at_1 == pytest.approx(0.5)
    # std(ddof=1) of [1, .5, 0] = sqrt((.25 + 0 + .25) / 2) = 0.5; SE = 0.5 / sqrt(3)
    assert m.pass_at_1_se == pytest.approx(0.5 / math.sqrt(3))
    assert (m.problems, m.samples, m.samples_per_problem) == (3, 12, (4, 4))
    assert pass_at_1([0.25, 0.25]) == (0.25, 0.0)


def test_pass_at_1_weighs_problems_equally_whatever_their_k():
    # 1 of 2 and 1 of 4 correct: mean of rates 0.375, not the pooled 2/6.
    samples = [S("a", 0, True), S("a", 1, False)] + [S("b", j, j == 3) for j in range(4)]
    (m,) = budget_metrics(samples)
    assert m.pass_at_1 == pytest.approx(0.375)
    assert m.pass_at_1_se == pytest.approx(math.sqrt(((0.125 ** 2) * 2) / 1) / math.sqrt(2))
    assert m.samples_per_problem == (2, 4)


def test_single_problem_has_no_standard_error():
    (m,) = budget_metrics([S("a", 0, True), S("a", 1, False)])
    assert m.pass_at_1 == 0.5 and m.pass_at_1_se is None


def test_majority_vote_largest_group_wins():
    votes = [S(0, 0, False, "7"), S(0, 1, True, "5"), S(0, 2, False, "7"), S(0, 3, False, "7"), S(0, 4, True, "5")]
    assert majority_vote(votes) == ("7", False)
    votes[0] = S(0, 0, True, "5")
    assert majority_vote(votes) == ("5", True)


def test_majority_vote_ties_go_to_the_earliest_drawn_answer():
    # 2 correct vs 2 wrong: whichever group's first sample was drawn first wins.
    correct_first = [S(0, 0, True, "5"), S(0, 1, False, "7"), S(0, 2, False, "7"), S(0, 3, True, "5")]
    assert majority_vote(correct_first) == ("5", True)
    wrong_first = [S(0, 0, False, "7"), S(0, 1, True, "5"), S(0, 2, False, "7"), S(0, 3, True, "5")]
    assert majority_vote(wrong_first) == ("7", False)
    # The order of the records does not matter, only the sample indices.
    assert majority_vote(list(reversed(wrong_first))) == ("7", False)
    # Three-way tie among wrong answers: the earliest drawn (sample 1) wins.
    three = [S(0, 2, False, "8"), S(0, 1, False, "9"), S(0, 0, False, None), S(0, 3, False, "6")]
    assert majority_vote(three) == ("9", False)


def test_majority_vote_groups_correct_spellings_and_ignores_missing_answers():
    # Three spellings of the gold 1/2 (all checked correct) outvote two identical wrong answers.
    votes = [S(0, 0, False, "3"), S(0, 1, True, "1/2"), S(0, 2, False, " 3"), S(0, 3, True, "\\frac{1}{2}"),
             S(0, 4, True, "0.5"), S(0, 5, False, None), S(0, 6, False, None), S(0, 7, False, None)]
    assert majority_vote(votes) == ("1/2", True)
    # Whitespace does not split a group: "1 2" and "12" are one answer.
    assert majority_vote([S(0, 0, True, "4"), S(0, 1, False, "1 2"), S(0, 2, False, "12")]) == ("1 2", False)
    # No sample with an answer: unsolved, no winning answer.
    assert majority_vote([S(0, 0, False, None), S(0, 1, False, None)]) == (None, False)


def test_majority_accuracy_over_problems():
    samples = [S("a", 0, True, "1"), S("a", 1, True, "1"), S("a", 2, False, "2"),   # solved
               S("b", 0, False, "9"), S("b", 1, True, "4"), S("b", 2, False, "9"),   # not solved
               S("c", 0, False, None), S("c", 1, False, None), S("c", 2, True, "3")]  # solved (only vote)
    (m,) = budget_metrics(samples)
    assert m.majority == pytest.approx(2 / 3)
    assert m.no_answer_rate == pytest.approx(2 / 9)


def test_budgets_tokens_and_truncation():
    # Two problems x 2 samples, seen at budgets 4 and 8 (records given out of order).
    rows = [
        # (problem, sample, budget, tokens, answer, correct, truncated)
        ("p", 0, 8, 3, "1", True, False), ("p", 0, 4, 3, "1", True, False),    # ended within 4
        ("p", 1, 8, 7, "1", True, False), ("p", 1, 4, 4, None, False, True),   # cut by 4: answer lost
        ("q", 0, 8, 8, None, False, True), ("q", 0, 4, 4, None, False, True),  # never ended
        ("q", 1, 8, 6, "2", False, False), ("q", 1, 4, 4, None, False, True),
    ]
    metrics = budget_metrics([SampleResult(*r) for r in reversed(rows)])
    assert [m.budget for m in metrics] == [4, 8]
    small, large = metrics
    assert small.pass_at_1 == pytest.approx((0.5 + 0.0) / 2) and large.pass_at_1 == pytest.approx((1.0 + 0.0) / 2)
    assert small.truncation_rate == pytest.approx(3 / 4) and large.truncation_rate == pytest.approx(1 / 4)
    assert small.mean_tokens == pytest.approx((3 + 4 + 4 + 4) / 4) and small.median_tokens == 4.0
    assert large.mean_tokens == pytest.approx((3 + 7 + 8 + 6) / 4)
    assert large.median_tokens == pytest.approx((6 + 7) / 2)  # even count: mean of the two middle values
    assert small.majority == 0.5 and large.majority == 0.5  # p: the one vote left at 4 is correct; q: none / wrong
    assert large.to_dict()["samples_per_problem"] == [2, 2]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no samples"):
        budget_metrics([])
    with pytest.raises(ValueError, match="at least one problem"):
        pass_at_1([])
    with pytest.raises(ValueError, match="appears twice"):
        budget_metrics([S("a", 0, True), S("a", 0, False)])
    with pytest.raises(ValueError, match="does not cover the same"):
        budget_metrics([S("a", 0, True, budget=4), S("a", 0, True, budget=8), S("a", 1, True, budget=8)])
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        budget_metrics([S("a", 0, True, tokens=-1)])
