"""bench/heldout_diff.py: the steps of a solution, where two solutions part, what kind of change lost a problem."""
from bench import heldout_diff
from fastmath.synthetic import make_splits

SFT = ("<think> 1+6=7 ; 7+6+0=13 ; 71+66=137 ; check: 66+71=137 ok ; 17-9=8 ; 13-1=12 ; 137-9=128 ; "
       "let me verify again: 128+9=137 ok </think> \\boxed{128}")


def test_re_checks_are_not_steps():
    assert heldout_diff.reasoning_steps(SFT) == ["1+6=7", "7+6+0=13", "71+66=137", "17-9=8", "13-1=12", "137-9=128"]
    assert heldout_diff.reasoning_steps("\\boxed{3}") == []
    assert heldout_diff.reasoning_steps("<think> 6*6=36 ; check: 6*6=36 ok ; 36/6") == ["6*6=36", "36/6"]


def test_the_synthetic_re_checks_are_the_ones_left_out():
    # If synthetic.py renamed its re-check steps, the comparison would count their removal as a change.
    rows = [row for row in make_splits(seed=0, verbose_fraction=1.0)["train"][:200]]
    for row in rows:
        steps = heldout_diff.reasoning_steps(row["solution"])
        assert steps and not any(" ok" in step for step in steps), row["solution"]


def test_a_moved_fact_is_told_from_a_dropped_step():
    wrong_fact = SFT.replace("17-9=8", "17-9=7").replace("137-9=128", "137-9=127")
    assert heldout_diff.first_difference(heldout_diff.reasoning_steps(SFT),
                                         heldout_diff.reasoning_steps(wrong_fact)) == (3, "17-9=8", "17-9=7")
    assert heldout_diff.flip_kind(SFT, wrong_fact) == "same expression, other result"
    dropped = SFT.replace("17-9=8 ; ", "")
    assert heldout_diff.flip_kind(SFT, dropped) == "fewer steps"
    other = SFT.replace("13-1=12", "14-1=13")
    assert heldout_diff.flip_kind(SFT, other) == "other expression"
    concise = "<think> 1+6=7 ; 7+6+0=13 ; 71+66=137 ; 17-9=8 ; 13-1=12 ; 137-9=128 </think> \\boxed{128}"
    assert heldout_diff.flip_kind(SFT, concise) == "same steps"
    assert heldout_diff.flip_kind(concise, concise.replace(" ; 137-9=128", "")) == "fewer steps"


def test_compare_counts_each_flip_once_with_its_kind():
    rows = [{"problem": f"p{i}", "answer": i} for i in range(4)]
    wrong_fact = SFT.replace("17-9=8", "17-9=7")
    before = ([SFT, SFT, SFT, SFT], [60, 60, 60, 60], [True, True, False, True])
    after = ([wrong_fact, SFT, SFT, SFT.replace("17-9=8 ; ", "")], [40, 40, 40, 40], [False, True, True, False])
    summary = heldout_diff.compare(rows, before, after)
    assert (summary["before_accuracy"], summary["after_accuracy"]) == (0.75, 0.5)
    assert (summary["before_tokens"], summary["after_tokens"]) == (60, 40)
    assert (summary["lost"], summary["gained"]) == (2, 1)
    assert summary["lost_by_kind"] == {"same expression, other result": 1, "fewer steps": 1}
    assert [(f["index"], f["direction"]) for f in summary["flips"]] == [(0, "lost"), (2, "gained"), (3, "lost")]
    assert summary["flips"][0]["first_difference"] == ["17-9=8", "17-9=7"]
