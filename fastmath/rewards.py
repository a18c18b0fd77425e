"""GRPO rewards: answer checking with math-verify in a worker pool, format, length (cosine, Kimi), overlong.

Every reward is a plain function `(prompts, completions, answers, **columns) -> list[float]`, one value per
completion. The trainer calls them with these columns (all lists, one entry per completion):
    correct     True / False from the shared answer check (None when the check timed out or failed)
    length      completion length in the configured unit (tokens by default, or characters)
    tokens      completion length in tokens (whatever the unit)
    group       index of the prompt group the completion belongs to (G completions per prompt)
    truncated   True when generation stopped at max_completion_length rather than at eos / a stop string
and keyword settings from `grpo.*` (`max_length` of the cosine reward in the length unit, the cosine end points,
`limit` = the generation limit in tokens, the overlong buffer). A user
reward can ignore what it does not need (`**columns`). Weighted sum: `grpo.reward_weights`.

Answer check (`AnswerChecker`): the content of the last balanced `\\boxed{...}` of the completion is parsed
by math-verify and compared with the parsed gold answer (fractions, decimals, LaTeX, intervals, sets all
go through sympy). It runs in worker processes because parsing adversarial text can take unbounded time:
each item has a time limit inside the worker (SIGALRM) and the whole batch a watchdog (a worker stuck in C
code is killed and the pool restarted). A timeout scores 0 and is counted, never raised. A gold answer that
math-verify cannot parse is a data error for that row: rows are checked when the prompts are loaded, and
the bad ones are counted and dropped (scoring every completion as correct against an unparseable gold
answer would reward anything).
"""
from __future__ import annotations

import math
import multiprocessing
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from fastmath.errors import ConfigError
from fastmath.synthetic import extract_boxed

# ---------------------------------------------------------------------------------------------
# Answer checking (math-verify, in worker processes)


@dataclass
class Verdict:
    correct: bool | None  # None: not decided (timeout or checker error) -> scores as wrong, counted
    status: str           # "correct", "wrong", "no_answer", "timeout", "error"


class _ItemTimeout(Exception):
    pass


def _on_alarm(signum, frame):  # pragma: no cover - runs in the worker
    raise _ItemTimeout()


def _worker_init():  # pragma: no cover - runs in the worker
    import logging

    signal.signal(signal.SIGALRM, _on_alarm)
    # math-verify warns on every call that its own (signal-based) timeout is off: ours replaces it, since
    # both would share the one ITIMER_REAL of the process.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import once per worker, not per item)


def _parse(text: str):
    from math_verify import parse

    # math-verify's own timeout uses signals too; ours (the caller's alarm) bounds the whole item.
    return parse("\\boxed{" + text + "}", parsing_timeout=None)


def _under_alarm(limit: float, fn: Callable, *args):
    """fn(*args) with SIGALRM armed `limit` seconds ahead (worker main thread): raises _ItemTimeout if late."""
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _timed_call(item: tuple[float, Callable, object]):
    """(limit, fn, arg) -> fn(arg), or the string "timeout". Runs inside a worker process."""
    limit, fn, arg = item
    try:
        return _under_alarm(limit, fn, arg)
    except _ItemTimeout:
        return "timeout"


def _parsed_gold(gold: str):
    """math-verify's parse of a gold answer, or None when it found no mathematical object (only its raw-string
    fallback, e.g. for `\\frac{`): such a gold answer cannot be compared to anything meaningfully."""
    parsed = _parse(gold)
    return parsed if any(not isinstance(x, str) for x in parsed) else None


def _verify(boxed: str, gold: str) -> bool | None:
    from math_verify import verify

    gold_parsed = _parsed_gold(gold)
    if gold_parsed is None:
        return None
    return bool(verify(gold_parsed, _parse(boxed), timeout_seconds=None))


def _check_one(item: tuple[str | None, str, float]) -> tuple[str, bool | None]:
    """(boxed content or None, gold, seconds) -> (status, correct). Runs inside a worker process."""
    boxed, gold, limit = item
    if boxed is None or not boxed.strip():
        return "no_answer", False
    try:
        ok = _under_alarm(limit, _verify, boxed, gold)
    except _ItemTimeout:
        return "timeout", None
    except Exception:  # sympy can raise almost anything on hostile input; it is a wrong answer, counted
        return "error", None
    if ok is None:
        return "error", None
    return ("correct" if ok else "wrong"), ok


def _gold_parses(item: tuple[str, float]) -> bool:
    gold, limit = item
    try:
        return _under_alarm(limit, _parsed_gold, gold) is not None
    except BaseException:
        return False


class AnswerChecker:
    """A pool of `workers` processes checking answers, each item limited to `timeout_s` seconds.

    The pool starts with the "spawn" method: forking a process that holds OpenMP threads (torch) or a vLLM
    engine can deadlock the child. Use as a context manager or call `close()`.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        if workers < 1 or timeout_s <= 0:
            raise ConfigError(f"answer checker needs workers >= 1 and timeout > 0, got {workers}, {timeout_s}")
        self.workers, self.timeout_s = workers, timeout_s
        self.counts: Counter = Counter()  # cumulative statuses, for the run's metrics
        self.restarts = 0
        self._pool = None

    def _start(self):
        ctx = multiprocessing.get_context("spawn")
        self._pool = ctx.Pool(self.workers, initializer=_worker_init)

    def _map(self, fn: Callable, items: list, on_timeout):
        """fn over items in the pool; items not back by the watchdog deadline get `on_timeout`."""
        if not items:
            return []
        if self._pool is None:
            self._start()
        pending = [self._pool.apply_async(fn, (item,)) for item in items]
        # Each worker takes items one after another, so the last one may start late; allow for that.
        deadline = time.monotonic() + self.timeout_s * (math.ceil(len(items) / self.workers) + 1) + 2
        results, stuck = [], False
        for job in pending:
            try:
                results.append(job.get(timeout=max(0.0, deadline - time.monotonic())))
            except multiprocessing.TimeoutError:
                results.append(on_timeout)
                stuck = True
        if stuck:  # a worker is hung in C code where the alarm cannot reach it: replace the pool
            self._pool.terminate()
            self._pool = None
            self.restarts += 1
        return results

    def check(self, completions: list[str], golds: list[str]) -> list[Verdict]:
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        items = [(extract_boxed(text), gold, self.timeout_s) for text, gold in zip(completions, golds)]
        out = []
        for status, correct in self._map(_check_one, items, ("timeout", None)):
            self.counts[status] += 1
            out.append(Verdict(correct, status))
        return out

    def gold_parses(self, golds: list[str]) -> list[bool]:
        return self._map(_gold_parses, [(g, self.timeout_s) for g in golds], False)

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Reward functions


def accuracy_reward(prompts, completions, answers, *, correct, **columns) -> list[float]:
    """1 for a correct final boxed answer, 0 otherwise (a timed-out check counts as 0)."""
    return [1.0 if c else 0.0 for c in correct]


_THINK_FORMAT = re.compile(r"\A\s*<think>(?:(?!<think>|</think>).)*</think>(?:(?!<think>|</think>).)*\Z", re.S)


def format_ok(text: str) -> bool:
    """Exactly one `<think>...</think>` block at the start, then a balanced `\\boxed{...}` after it."""
    if not _THINK_FORMAT.match(text):
        return False
    return extract_boxed(text.split("</think>", 1)[1]) is not None


def format_reward(prompts, completions, answers, **columns) -> list[float]:
    """1 when the completion is `<think> reasoning </think> ... \\boxed{answer} ...`, else 0."""
    return [1.0 if format_ok(text) else 0.0 for text in completions]


def cosine_value(length: float, max_length: int, start: float, end: float) -> float:
    """`end + (start - end) * (1 + cos(pi * min(L, Lmax) / Lmax)) / 2`: `start` at length 0, `end` at Lmax."""
    progress = min(length, max_length) / max_length
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def cosine_reward(prompts, completions, answers, *, correct, length, max_length,
                  cosine_correct=(1.0, 0.1), cosine_wrong=(-1.0, -0.1), **columns) -> list[float]:
    """Length-scaled correctness (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning"):
    correct answers earn more when short (1.0 -> 0.1 over [0, max_length]); wrong ones are punished less
    when long (-1.0 -> -0.1), so the model is not pushed to give up early on hard problems."""
    out = []
    for ok, n in zip(correct, length):
        start, end = cosine_correct if ok else cosine_wrong
        out.append(cosine_value(n, max_length, start, end))
    return out


def kimi_length_reward(prompts, completions, answers, *, correct, length, group, **columns) -> list[float]:
    """Kimi k1.5's length penalty, per prompt group: lambda = 0.5 - (L - Lmin) / (Lmax - Lmin); a correct
    completion gets lambda, a wrong one min(0, lambda) (long wrong answers are penalised, short wrong ones
    are not rewarded). A group whose completions all have one length gets 0."""
    span: dict[int, tuple[float, float]] = {}
    for g, n in zip(group, length):
        lo, hi = span.get(g, (n, n))
        span[g] = (min(lo, n), max(hi, n))
    out = []
    for ok, n, g in zip(correct, length, group):
        lo, hi = span[g]
        if hi == lo:
            out.append(0.0)
            continue
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


def overlong_reward(prompts, completions, answers, *, tokens, limit, overlong_buffer, **columns) -> list[float]:
    """DAPO's soft overlong punishment, in tokens against the generation limit: 0 up to limit - buffer, then
    falling linearly to -1 at the limit (and -1 beyond)."""
    out = []
    threshold = limit - overlong_buffer
    for n in tokens:
        if n <= threshold:
            out.append(0.0)
        elif n <= limit:
            out.append((threshold - n) / overlong_buffer)
        else:
            out.append(-1.0)
    return out


REWARDS: dict[str, Callable[..., list[float]]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "cosine": cosine_reward,
    "length": kimi_length_reward,
    "overlong": overlong_reward,
}


@dataclass
class RewardTable:
    """Per-completion values of every reward component and their weighted total."""

    components: dict[str, list[float]]
    total: list[float]
    failures: dict[str, str] = field(default_factory=dict)  # reward name -> its error (it scored 0 for all)


def compute_rewards(names: list[str], weights: list[float], prompts: list[str], completions: list[str],
                    answers: list[str], columns: dict, settings: dict) -> RewardTable:
    """Run each named reward; a reward that raises scores 0 for the batch and is counted (never a crash
    mid-run, never a silent success): the caller reports `failures` in the step metrics."""
    n = len(completions)
    components, failures = {}, {}
    for name in names:
        fn = REWARDS[name]
        try:
            values = [float(v) for v in fn(prompts, completions, answers, **columns, **settings)]
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values for {n} completions")
            if not all(math.isfinite(v) for v in values):
                raise ValueError("returned a non-finite value")
        except Exception as err:  # a user reward's bug must not kill a multi-day run; it is counted
            failures[name] = f"{type(err).__name__}: {err}"[:200]
            values = [0.0] * n
        components[name] = values
    total = [sum(w * components[name][i] for name, w in zip(names, weights)) for i in range(n)]
    return RewardTable(components, total, failures)
