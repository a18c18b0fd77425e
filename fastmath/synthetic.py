"""Deterministic generator of small, verifiable math problems (the embedded default data set).

Every problem comes with two complete worked solutions in the recipe's reasoning format

    <think> STEP ; STEP ; ... </think> \\boxed{ANSWER}

`concise` holds only the steps needed; `verbose` is the same chain padded with redundant re-checks
("check: ... ok", "let me verify again: ... ok"), 1.6-1.9 times as long, so GRPO has length to remove.
Each step is one elementary operation written out in full, so a 1-2 M parameter model can compute
every token from the few tokens right before it: sums and differences go by columns (units, then the tens
after a carry or a borrow, then the whole number copied together):

| family       | problem (example)                                | concise steps -> answer                         |
|--------------|--------------------------------------------------|-------------------------------------------------|
| `arithmetic` | What is 47 + 38 - 6?                             | 7+8=15 ; 4+3+1=8 ; 47+38=85 ; 15-6=9 ;          |
|              |                                                  | 8-1=7 ; 85-6=79 -> 79                           |
| `linear`     | Solve for x: 3x + 5 = 26  (or 26 = 5 + 3x, ...)  | 6-5=1 ; 3x=26-5=21 ; x=21/3=7 -> 7              |
| `word`       | Tom has 12 apples and buys 7 more, then ...      | 2+7=9 ; 12+7=19 ; 9-5=4 ; 19-5=14 -> 14         |
|              | Ann has 4 bags with 3 coins in each bag. ...     | 4*3=12 -> 12                                    |
|              | A bus travels 40 km per hour for 3 hours. ...    | 4*3=12 ; 40*3=120 -> 120                        |
|              | Mia shares 6 pizzas equally among 4 friends. ... | 6/4 ; gcd(6,4)=2 ; 6/2=3 ; 4/2=2 -> \\frac{3}{2} |

Numbers stay small (operands of one or two digits, answers below 1,000). Only the sharing template of
`word` gives fractions, written `\\frac{p}{q}` in lowest terms (an integer when q = 1).
Mean characters (concise / verbose): arithmetic 81 / 138, linear 59 / 113, word 57 / 100. The smallest
space is `linear` (about 5,000 distinct texts): make_splits handles n_train up to about 12,000.

Why sums and differences go by columns (measured, issue 16): with "85-6=79", "12+7=19" and "3x=26-5=21"
written as one step each (embedded data v1), the demo's SFT stage ended at 71.5% held-out greedy accuracy
(seed 0, AVX2), and in 56 of its 59 wrong answers the first false step was such a one-step sum or difference
(51 subtractions, mostly off in the units digit); multiplications, divisions, gcds and the column additions
were all but always right. A step that needs a carry or a borrow decided before its first digit is written
is the hard case for a small transformer that writes the most significant digit first; by columns the carry or
the borrow is in the text before it is needed.

Determinism: everything is drawn from `random.Random` instances seeded with integers and the uid is a
sha1 of the text, so the output is identical across processes, runs and `PYTHONHASHSEED` values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

FAMILIES: tuple[str, ...] = ("arithmetic", "linear", "word")

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Leo", "Zoe")
ITEMS = ("apples", "pears", "marbles", "stickers")
VEHICLES = ("train", "bus", "car", "truck")
FOODS = ("pizzas", "cakes", "pies")

# A split gives up on a family after this many generated duplicates in a row: the space is exhausted.
MAX_DUPLICATES_IN_A_ROW = 2000


@dataclass(frozen=True)
class Problem:
    """One problem with its gold answer and two worked solutions reaching that answer."""

    uid: str
    family: str
    problem: str
    answer: str
    concise: str
    verbose: str


def _format_solution(steps: list[str], answer: str) -> str:
    return "<think> " + " ; ".join(steps) + " </think> \\boxed{" + answer + "}"


def _problem(family: str, problem: str, answer: str, steps: list[str], checked: list[str]) -> Problem:
    """Build a Problem; `checked` is the step list with the redundant re-checks inserted."""
    uid = family + "-" + hashlib.sha1(problem.encode("utf-8")).hexdigest()[:12]
    return Problem(uid, family, problem, answer, _format_solution(steps, answer), _format_solution(checked, answer))


def _column_addition(a: int, b: int) -> list[str]:
    """Column-by-column addition of two 2-digit numbers: units, tens with carry, then the whole sum.

    47 + 38 -> ["7+8=15", "4+3+1=8", "47+38=85"]
    """
    units = a % 10 + b % 10
    carry = units // 10
    tens = a // 10 + b // 10 + carry
    return [f"{a % 10}+{b % 10}={units}", f"{a // 10}+{b // 10}+{carry}={tens}", f"{a}+{b}={a + b}"]


def _add_digit(x: int, d: int, last: str | None = None) -> list[str]:
    """x + d for a single digit d, by columns: the units, then the tens only when they carry, then the whole.

    22 + 6 -> ["2+6=8", "22+6=28"];  15 + 9 -> ["5+9=14", "1+1=2", "15+9=24"];  5 + 3 -> ["5+3=8"].
    `last` replaces the final step's text (the linear family writes "3x=21+5=26" there). Why by columns: the
    module docstring (measured).
    """
    units = x % 10 + d
    steps = [] if x < 10 else [f"{x % 10}+{d}={units}"]
    if x >= 10 and units >= 10:
        steps.append(f"{x // 10}+1={x // 10 + 1}")
    return steps + [last or f"{x}+{d}={x + d}"]


def _subtract_digit(x: int, d: int, last: str | None = None) -> list[str]:
    """x - d (x >= d, d a single digit) by columns: the units (borrowing ten when they are short), the tens
    after a borrow when there are tens left, then the whole.

    85 - 6 -> ["15-6=9", "8-1=7", "85-6=79"];  122 - 1 -> ["2-1=1", "122-1=121"];  14 - 9 -> ["14-9=5", "14-9=5"].
    """
    units = x % 10
    if x < 10:  # a single-digit fact
        return [last or f"{x}-{d}={x - d}"]
    if units >= d:
        steps = [f"{units}-{d}={units - d}"]
    else:
        steps = [f"{units + 10}-{d}={units + 10 - d}"] + ([f"{x // 10}-1={x // 10 - 1}"] if x >= 20 else [])
    return steps + [last or f"{x}-{d}={x - d}"]


def _arithmetic(rng: random.Random) -> Problem:
    """a + b - c with a, b two-digit and c one-digit; the sum is done by columns."""
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 9)
    total, result = a + b, a + b - c
    steps = _column_addition(a, b) + _subtract_digit(total, c)
    checked = [*steps[:3], f"check: {b}+{a}={total} ok", *steps[3:], f"let me verify again: {result}+{c}={total} ok"]
    return _problem("arithmetic", f"What is {a} + {b} - {c}?", str(result), steps, checked)


def _linear(rng: random.Random) -> Problem:
    """a*x + b = c or a*x - b = c (terms in either order, sides either way) with integer x >= 1.

    Isolate a*x by moving b across, then divide by a.
    """
    a, x, b = rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 9)
    minus = rng.random() < 0.5 and a * x > b  # keep c positive: negative numbers are not taught here
    c = a * x - b if minus else a * x + b
    lhs = rng.choice((f"{a}x - {b}",) if minus else (f"{a}x + {b}", f"{b} + {a}x"))
    question = rng.choice((f"{lhs} = {c}", f"{c} = {lhs}"))
    if minus:
        isolate, back = _add_digit(c, b, f"{a}x={c}+{b}={a * x}"), f"{a}*{x}-{b}={c}"
    else:
        isolate, back = _subtract_digit(c, b, f"{a}x={c}-{b}={a * x}"), f"{a}*{x}+{b}={c}"
    steps = [*isolate, f"x={a * x}/{a}={x}"]
    checked = [*steps, f"check: {a}*{x}={a * x} ok", f"let me verify again: {back} ok"]
    return _problem("linear", f"Solve for x: {question}", str(x), steps, checked)


def _word_apples(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(5, 30), rng.randint(2, 9), rng.randint(1, 9)
    total, result = a + b, a + b - c
    text = (f"{name} has {a} {item} and buys {b} more, then gives away {c}. "
            f"How many {item} does {name} have?")
    steps = _add_digit(a, b) + _subtract_digit(total, c)
    checked = [*steps, f"let me verify again: {result}+{c}={total} ok"]
    return _problem("word", text, str(result), steps, checked)


def _word_coins(rng: random.Random) -> Problem:
    name, bags, coins = rng.choice(NAMES), rng.randint(2, 9), rng.randint(2, 9)
    text = f"{name} has {bags} bags with {coins} coins in each bag. How many coins does {name} have?"
    steps = [f"{bags}*{coins}={bags * coins}"]
    checked = [*steps, f"check: {coins}*{bags}={bags * coins} ok",
               f"let me verify again: {bags * coins}/{bags}={coins} ok"]
    return _problem("word", text, str(bags * coins), steps, checked)


def _word_travel(rng: random.Random) -> Problem:
    vehicle, tens, hours = rng.choice(VEHICLES), rng.randint(2, 9), rng.randint(2, 9)
    speed, distance = 10 * tens, 10 * tens * hours
    text = f"A {vehicle} travels {speed} km per hour for {hours} hours. How many km does it travel?"
    steps = [f"{tens}*{hours}={tens * hours}", f"{speed}*{hours}={distance}"]
    checked = [*steps, f"let me verify again: {hours}*{speed}={distance} ok"]
    return _problem("word", text, str(distance), steps, checked)


def _word_sharing(rng: random.Random) -> Problem:
    """m items shared by n friends: m/n reduced by gcd; the only template with fraction answers."""
    name, food = rng.choice(NAMES), rng.choice(FOODS)
    m, n = rng.randint(1, 20), rng.randint(2, 6)
    g = math.gcd(m, n)
    p, q = m // g, n // g
    answer = str(p) if q == 1 else f"\\frac{{{p}}}{{{q}}}"
    text = (f"{name} shares {m} {food} equally among {n} friends. "
            f"How many {food} does each friend get?")
    steps = [f"{m}/{n}", f"gcd({m},{n})={g}", f"{m}/{g}={p}", f"{n}/{g}={q}"]
    checked = [*steps, f"check: {p}*{g}={m} ok", f"let me verify again: {q}*{g}={n} ok"]
    return _problem("word", text, answer, steps, checked)


_WORD_TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _word_apples, _word_coins, _word_travel, _word_sharing,
)


def _word(rng: random.Random) -> Problem:
    return rng.choice(_WORD_TEMPLATES)(rng)


_GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": _arithmetic, "linear": _linear, "word": _word,
}


def generate_problem(rng: random.Random, family: str) -> Problem:
    """Draw one problem of `family` (one of FAMILIES) using only `rng`."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown problem family {family!r}; expected one of {FAMILIES}")
    return _GENERATORS[family](rng)


def _unique_problems(rng: random.Random, n: int, seen: set[str], split: str) -> list[Problem]:
    """n problems, families round-robin, none whose text is in `seen` (which is updated)."""
    problems = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        for _ in range(MAX_DUPLICATES_IN_A_ROW):
            problem = generate_problem(rng, family)
            if problem.problem not in seen:
                break
        else:
            raise ValueError(
                f"the {family!r} problem space is too small: after {len(seen)} distinct problems in all, "
                f"{MAX_DUPLICATES_IN_A_ROW} draws in a row were duplicates (at {split} row {i} of {n}); "
                f"ask for fewer problems"
            )
        seen.add(problem.problem)
        problems.append(problem)
    return problems


def _row(problem: Problem, style: str) -> dict:
    solution = problem.verbose if style == "verbose" else problem.concise
    return {"problem": problem.problem, "solution": solution, "answer": problem.answer,
            "family": problem.family, "style": style, "uid": problem.uid}


def make_splits(seed: int = 0, n_train: int = 4000, n_validation: int = 200, n_test: int = 200,
                verbose_fraction: float = 0.5) -> dict[str, list[dict]]:
    """{"train", "validation", "test"} -> rows with keys problem, solution, answer, family, style, uid.

    Families alternate row by row. Exactly round(verbose_fraction * n_train) train rows, chosen at random,
    carry the verbose solution; all other rows (all of validation and test) carry the concise one.
    Test is drawn first, then validation, then train, so the test set does not change with n_train.
    No problem text appears twice, within or across splits; ValueError if the space runs out.
    """
    if not 0.0 <= verbose_fraction <= 1.0:
        raise ValueError(f"verbose_fraction must be in [0, 1], got {verbose_fraction}")
    rng = random.Random(seed)
    seen: set[str] = set()
    test = _unique_problems(rng, n_test, seen, "test")
    validation = _unique_problems(rng, n_validation, seen, "validation")
    train = _unique_problems(rng, n_train, seen, "train")
    verbose_rows = set(rng.sample(range(n_train), round(verbose_fraction * n_train)))
    return {
        "train": [_row(p, "verbose" if i in verbose_rows else "concise") for i, p in enumerate(train)],
        "validation": [_row(p, "concise") for p in validation],
        "test": [_row(p, "concise") for p in test],
    }


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """Write one JSON object per line (utf-8) atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; give it the usual mode of a data file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

