"""The evaluation's arithmetic: pass@1 and its standard error, majority vote, output tokens and truncation.

Pure functions over `SampleResult` records (one per problem x sample x token budget); no model, no I/O.
`fastmath/eval.py` produces the records; these functions turn them into one `BudgetMetrics` per budget.

Definitions, for one budget B over n problems, problem i with k_i samples (k_i may differ between problems):

    pass@1          p_i = (correct samples of i) / k_i, and pass@1 = (1/n) sum_i p_i. Every problem weighs the
                    same, whatever its k_i (the seed paper's "pass@1 averaged over 64 samples").
    standard error  SE = std(p_1..p_n, ddof=1) / sqrt(n): the standard error of the mean of the per-problem pass
                    rates across problems. It treats the problems as drawn from a larger pool, so it holds both
                    the between-problem spread and the finite-k sampling noise of each p_i; it is not the
                    binomial SE of the k*n samples pooled (which would ignore that samples of one problem are
                    correlated). Undefined (None) for n = 1.
    majority vote   per problem, each sample that has an extracted answer votes for it; samples without one do
                    not vote. Votes are grouped as follows: all samples the answer check found correct form ONE
                    group (each equals the gold answer, hence each other, whatever the spelling); every other
                    sample is grouped by its answer text with whitespace removed. The largest group wins. A tie
                    goes to the tied group whose earliest sample (lowest sample index) was drawn first, so the
                    result is deterministic and does not favour correct answers. The problem counts as solved
                    when the winning group is the correct one; a problem with no votes is unsolved.
                    maj accuracy = solved problems / n. (Limitation: two wrong answers spelled differently, e.g.
                    "0.5" and "1/2" when the gold is 3, are counted as different answers.)
    output tokens   mean and median (the middle value, or the mean of the two middle values) over all samples
                    of the number of generated tokens kept within the budget (not counting a final eos token).
    truncation rate truncated samples / samples: a sample is truncated at B when it had not ended (eos or stop
                    string) within B tokens.
    no-answer rate  samples without an extracted answer / samples.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Hashable, Iterable


@dataclass(frozen=True)
class SampleResult:
    """One sample of one problem, seen at one token budget."""

    problem: Hashable   # problem key (unique within an evaluation)
    sample: int         # index of the sample within its problem, in the order the samples were drawn
    budget: int         # the token budget this record is for
    tokens: int         # generated tokens kept within the budget (a final eos not counted)
    answer: str | None  # the extracted final answer, None when there is none
    correct: bool       # the answer check's verdict (a timed-out check counts as False)
    truncated: bool     # the sample had not ended within `budget` tokens


@dataclass
class BudgetMetrics:
    budget: int
    problems: int
    samples: int
    pass_at_1: float
    pass_at_1_se: float | None  # None when there is a single problem
    majority: float
    mean_tokens: float
    median_tokens: float
    truncation_rate: float
    no_answer_rate: float
    samples_per_problem: tuple[int, int]  # (smallest k_i, largest k_i)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["samples_per_problem"] = list(self.samples_per_problem)
        return out


def pass_at_1(rates: list[float]) -> tuple[float, float | None]:
    """(mean of the per-problem pass rates, its standard error std(ddof=1)/sqrt(n), None for n = 1)."""
    if not rates:
        raise ValueError("pass@1 needs at least one problem")
    n = len(rates)
    mean = math.fsum(rates) / n
    if n == 1:
        return mean, None
    variance = math.fsum((r - mean) ** 2 for r in rates) / (n - 1)
    return mean, math.sqrt(variance / n)


_CORRECT_GROUP = ("correct",)  # a key no answer text can collide with (texts are str)


def majority_vote(samples: list[SampleResult]) -> tuple[str | None, bool]:
    """(winning answer, solved) for the samples of ONE problem at one budget; see the module docstring.

    The winning answer is the earliest-drawn sample's answer of the winning group; (None, False) when no
    sample has an answer.
    """
    groups: dict[Hashable, list[SampleResult]] = defaultdict(list)
    for s in samples:
        if s.answer is None:
            continue
        key = _CORRECT_GROUP if s.correct else "".join(s.answer.split())
        groups[key].append(s)
    if not groups:
        return None, False
    # Most votes first; among equals, the group whose first sample was drawn earliest.
    key, members = min(groups.items(), key=lambda kv: (-len(kv[1]), min(s.sample for s in kv[1])))
    first = min(members, key=lambda s: s.sample)
    return first.answer, key == _CORRECT_GROUP


def budget_metrics(results: Iterable[SampleResult]) -> list[BudgetMetrics]:
    """One BudgetMetrics per budget, in increasing budget order.

    Raises ValueError on empty input, on a repeated (problem, sample, budget), or when the budgets do not
    cover the same (problem, sample) pairs (each budget must be a view of the same samples).
    """
    by_budget: dict[int, dict[Hashable, list[SampleResult]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for r in results:
        key = (r.problem, r.sample, r.budget)
        if key in seen:
            raise ValueError(f"sample {r.sample} of problem {r.problem!r} appears twice at budget {r.budget}")
        if r.tokens < 0 or r.budget <= 0:
            raise ValueError(f"bad record {r}: tokens must be >= 0 and budget > 0")
        seen.add(key)
        by_budget[r.budget][r.problem].append(r)
    if not by_budget:
        raise ValueError("no samples to summarise")
    layouts = {b: {(p, s.sample) for p, items in probs.items() for s in items} for b, probs in by_budget.items()}
    first_budget = min(layouts)
    for b, layout in layouts.items():
        if layout != layouts[first_budget]:
            raise ValueError(f"budget {b} does not cover the same (problem, sample) pairs as budget {first_budget}")
    return [_one_budget(b, by_budget[b]) for b in sorted(by_budget)]


def _one_budget(budget: int, problems: dict[Hashable, list[SampleResult]]) -> BudgetMetrics:
    flat = [s for items in problems.values() for s in items]
    rates = [sum(s.correct for s in items) / len(items) for items in problems.values()]
    mean, se = pass_at_1(rates)
    solved = sum(majority_vote(items)[1] for items in problems.values())
    tokens = [s.tokens for s in flat]
    ks = [len(items) for items in problems.values()]
    return BudgetMetrics(
        budget=budget, problems=len(problems), samples=len(flat), pass_at_1=mean, pass_at_1_se=se,
        majority=solved / len(problems), mean_tokens=math.fsum(tokens) / len(tokens),
        median_tokens=float(statistics.median(tokens)),
        truncation_rate=sum(s.truncated for s in flat) / len(flat),
        no_answer_rate=sum(s.answer is None for s in flat) / len(flat),
        samples_per_problem=(min(ks), max(ks)))
