"""Final answers: extracting the last `\\boxed{...}` of a text, deciding whether a gold answer is usable, and
checking answers against gold with math-verify in a pool of worker processes with a time limit per item.

The one answer module of the project: the GRPO accuracy reward, the held-out check and the eval stage all
extract with `extract_boxed` and check with `AnswerChecker`, so a number means the same thing everywhere.

Extraction is one pass over the text (a stack of open braces), so a hostile completion of n characters
costs O(n) in the trainer process, never more. The text is the judged one (`fastmath.data.Formatter.judged`):
when the chat template's generation prompt pre-fills the reasoning opening (`<think>\n`), that opening and the
completion together, so an answer is read from the whole assistant turn whatever the template.

Checking (mode 'last_box', the default): math-verify parses the boxed content and the gold answer (fractions, decimals, LaTeX, intervals,
sets, equations all go through sympy) and compares them. Parsing adversarial text can take unbounded time,
sometimes inside C code where no signal reaches, so every item runs in a worker process under two limits:
    1. inside the worker, SIGALRM after `timeout_s`; the exception it raises derives from BaseException, so
       math-verify's own `except Exception` blocks cannot swallow it, and a flag set by the handler makes the
       item a timeout even if something swallowed it anyway;
    2. in the parent, a deadline per item (`timeout_s + KILL_GRACE_S` after the item was handed to a ready
       worker): a worker still busy then is killed and replaced, and only that item is lost.
A timeout scores as wrong, is counted (`counts["timeout"]`), and never raises. A batch therefore waits for a
slow item at most its own limit plus the grace, while the other workers go on with the rest.
Mode 'seed_parse' (`grpo.reward.answer_check`) is the seed's check instead: math-verify parses the whole completion with
the seed's options, so an unboxed final answer can count; same pool, same limits.

Gold answers (`gold_answer_text`, `AnswerChecker.gold_answers`): a row's answer is used only when it is a
mathematical value. The rule, applied in this order; the first failure is the row's skip reason:
    - JSON type: a string, or a number. A number read from a JSON file is kept as the text the file holds
      (`fastmath.data.JsonNumber`: `1e23` is 10^23 exactly, not the float 99999999999999991611392; a number
      written in exponent form is expanded exactly, `1e23` -> "100000000000000000000000", as math-verify reads
      no exponent); a number from parquet or the hub, an int or finite float, is converted to text (integers and
      integral floats as the integer, other floats as their shortest round-trip decimal without an exponent,
      0.1 -> "0.1", 1e-07 -> "0.0000001"). A boolean is not a number here; null, lists and objects are refused.
    - not empty, and not a placeholder for a missing answer (N/A, n.a., ?, -, ...);
    - no prose: no run of two or more letters outside LaTeX commands (`\\frac`, `\\pi`) and `\\text{...}`-like
      groups, unless it is a function or constant name (sin, log, pi, ...). "five", "see solution" and
      "The answer is 5" fail; "3\\sqrt{2}", "\\frac{1}{2}", "x=5", "(-\\infty, 3]", "C" pass;
    - math-verify parses it to a mathematical object (not only its raw-text fallback), and every free symbol
      of that object is a one-letter name (optionally subscripted, like x_1) or a Greek letter: a word
      hidden in `\\text{Devon}` parses to the symbol `devon` and fails, a unit in `5\\text{ cm}` is dropped by
      math-verify and passes.
"""
from __future__ import annotations

import math
import multiprocessing
import re
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import wait
from typing import Callable

from fastmath.data import JsonNumber
from fastmath.errors import ConfigError

# Seconds a worker may overrun its item's limit before the parent kills it: the in-worker alarm normally
# ends the item well within this; only code stuck where signals cannot reach it needs the kill.
KILL_GRACE_S = 1.0
# Seconds a new worker may take to start (spawn, import sympy and math-verify) before the checker gives up.
WORKER_START_LIMIT_S = 120.0

# ---------------------------------------------------------------------------------------------
# Extraction (linear time)

_BOX_OR_BRACE = re.compile(r"\\boxed\{|[{}]")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance (nested braces allowed), else None.

    "Last" means the box that opens last among those that close: a trailing box that never closes (a
    truncated generation) gives way to the one before it, and in `\\boxed{a \\boxed{b}}` the answer is `b`.
    One left-to-right pass over the braces with a stack: O(len(text)) for any input.
    """
    stack: list[int] = []  # for each open brace: where a box's content starts, or -1 for a plain brace
    best: tuple[int, int] | None = None
    for match in _BOX_OR_BRACE.finditer(text):
        token = match.group()
        if token == "}":
            if stack:
                start = stack.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, match.start())
        else:
            stack.append(match.end() if token != "{" else -1)
    return None if best is None else text[best[0]:best[1]]


# ---------------------------------------------------------------------------------------------
# Gold answers: the rule that decides which are mathematical values

# A JSON number in exponent form is expanded to plain digits up to this exponent; beyond, it is kept as written.
MAX_EXPANDED_EXPONENT = 400
_PLACEHOLDERS = {"n/a", "n.a.", "n.a", "na", "none", "null", "nil", "nan", "unknown", "tbd", "?", "-", "--", "...",
                 "\u2014", "\u2013"}
# Multi-letter names that stand for a function or a constant when written without a backslash.
_MATH_NAMES = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
               "log", "ln", "lg", "exp", "sqrt", "pi", "inf", "infty", "oo", "gcd", "lcm", "min", "max", "mod",
               "deg", "det"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
          "chi", "psi", "omega"}
# `\text{...}`-like groups whose content math-verify reads as a unit or a word; the parse rule judges them.
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_WORD = re.compile(r"(\\?)([A-Za-z]{2,})")


def gold_answer_text(value: object) -> tuple[str | None, str | None]:
    """(text, None) for a gold answer value that may be used, else (None, the reason it may not).

    Checks the JSON type, placeholders and prose (module docstring); the math-verify parse comes after,
    in `AnswerChecker.gold_answers`.
    """
    if isinstance(value, bool):
        return None, "gold answer is a boolean, not a number"
    if isinstance(value, JsonNumber):  # a JSON number, judged as the file wrote it, never through a float
        if value.lstrip("-") in ("NaN", "Infinity"):
            return None, "gold answer is not a finite number"
        exact = Decimal(value)
        if "e" in value.lower() and abs(exact.adjusted()) <= MAX_EXPANDED_EXPONENT:
            return format(exact, "f"), None  # 1e23 -> "100000000000000000000000", exactly (math-verify reads no 'e')
        return str(value), None
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, "gold answer is not a finite number"
        text = str(int(value)) if value.is_integer() else format(Decimal(repr(value)), "f")
        return text, None
    if not isinstance(value, str):
        kind = {list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
        return None, f"gold answer is {kind}, not a string or number"
    text = value.strip()
    if not text:
        return None, "gold answer is empty"
    if text.lower().replace(" ", "") in _PLACEHOLDERS:
        return None, "gold answer is a placeholder (like N/A)"
    for backslash, word in _WORD.findall(_TEXT_GROUP.sub(" ", text)):
        if not backslash and word.lower() not in _MATH_NAMES:
            return None, "gold answer is prose, not a mathematical value"
    return text, None


def _symbol_is_a_word(name: str) -> bool:
    base = name.split("_", 1)[0].strip("{}\\")
    return len(base) > 1 and base.lower() not in _GREEK and base.lower() not in _MATH_NAMES


# ---------------------------------------------------------------------------------------------
# Work done inside a worker process


class _ItemTimeout(BaseException):
    """Raised by the worker's alarm. A BaseException, so library code catching Exception lets it through."""


_alarm_fired = False


def _on_alarm(signum, frame):  # pragma: no cover - runs in the worker
    global _alarm_fired
    _alarm_fired = True
    raise _ItemTimeout()


def _parse(text: str):
    from math_verify import parse

    # math-verify's own timeout uses SIGALRM too; ours (armed by the worker loop) bounds the whole item.
    return parse("\\boxed{" + text + "}", parsing_timeout=None)


def _parsed_gold(gold: str) -> tuple[list | None, str | None]:
    """(math-verify's parse of a gold answer, None), or (None, why it cannot serve as a gold answer)."""
    parsed = _parse(gold)
    values = [x for x in parsed if not isinstance(x, str)]
    if not values:  # only the raw-string fallback (e.g. for `\\frac{`): nothing to compare with
        return None, "gold answer math-verify cannot parse"
    names = [str(s) for v in values for s in getattr(v, "free_symbols", ())]
    if any(_symbol_is_a_word(name) for name in names):
        return None, "gold answer parses to a word, not a mathematical value"
    return parsed, None


def _check_one(item: tuple[str | None, str]) -> tuple[str, bool | None]:
    """(boxed content or None, gold) -> (status, correct)."""
    from math_verify import verify

    boxed, gold = item
    if boxed is None or not boxed.strip():
        return "no_answer", False
    try:
        gold_parsed, problem = _parsed_gold(gold)
        if gold_parsed is None:
            return "error", None
        ok = bool(verify(gold_parsed, _parse(boxed), timeout_seconds=None))
    except Exception:  # sympy can raise almost anything on hostile input; counted, scores 0
        return "error", None
    return ("correct" if ok else "wrong"), ok


def _seed_parse(completion: str):
    """The seed's answer extraction (its grpo_rewards.check_answer): math-verify over the whole completion, LaTeX
    only, boxed content first, then the first match of any anchored LaTeX answer ('The final answer is $5$'),
    with nits and malformed_operators off and equations and units on."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    options = NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True, equations=True,
                                  boxed="all", units=True)
    config = LatexExtractionConfig(normalization_config=options, boxed_match_priority=0,
                                   try_extract_without_anchor=False)
    return parse(completion, extraction_config=[config], extraction_mode="first_match", parsing_timeout=None)


def _check_whole(item: tuple[str, str]) -> tuple[str, bool | None]:
    """(judged completion, gold) -> (status, correct), the seed's way: its whole-completion parse, verified with
    the completion's parse in math-verify's gold position as the seed calls it (verify(answer, gold))."""
    from math_verify import verify

    text, gold = item
    try:
        gold_parsed, problem = _parsed_gold(gold)
        if gold_parsed is None:
            return "error", None
        answer = _seed_parse(text)
        if not answer:
            return "no_answer", False
        ok = bool(verify(answer, gold_parsed, timeout_seconds=None))
    except Exception:  # sympy can raise almost anything on hostile input; counted, scores 0
        return "error", None
    return ("correct" if ok else "wrong"), ok


CHECK_MODES = ("last_box", "seed_parse")


def _gold_problem(gold: str) -> str | None:
    try:
        return _parsed_gold(gold)[1]
    except Exception:
        return "gold answer math-verify cannot parse"


_TIMEOUT, _ERROR, _READY = "__timeout__", "__error__", "__ready__"


def _run_item(fn: Callable, arg, limit: float):
    """fn(arg) under SIGALRM `limit` seconds ahead; _TIMEOUT if the alarm fired, even if it was swallowed."""
    global _alarm_fired
    _alarm_fired = False
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        result = fn(arg)
    except _ItemTimeout:
        result = _TIMEOUT
    except Exception:
        result = _ERROR
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return _TIMEOUT if _alarm_fired else result


def _worker_main(conn) -> None:  # pragma: no cover - runs in the worker
    import logging

    signal.signal(signal.SIGALRM, _on_alarm)
    # math-verify warns on every call that its own (signal-based) timeout is off: ours replaces it, since
    # both would share the one ITIMER_REAL of the process.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # The seed's options keep equations=True, which latex2sympy2_extended still applies but warns about per call.
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    # One check before reporting ready: the first parse builds math-verify's grammar and imports the rest of
    # sympy (about a second), a one-time cost that must not count against the first item's limit.
    _check_one(("\\frac{1}{2}", "0.5"))
    conn.send(_READY)
    while True:
        try:
            fn, arg, limit = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe: done
            return
        conn.send(_run_item(fn, arg, limit))


# ---------------------------------------------------------------------------------------------
# The pool, in the parent


@dataclass
class Verdict:
    correct: bool | None  # None: not decided (timeout or checker error) -> scores as wrong, counted
    status: str           # "correct", "wrong", "no_answer", "timeout", "error"


class _Worker:
    """One worker process and its pipe; `index` is the item it is working on (None when idle)."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.index: int | None = None
        self.deadline = math.inf

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class AnswerChecker:
    """`workers` processes checking answers, each item limited to `timeout_s` seconds (see the module doc).

    Workers start with the "spawn" method: forking a process that holds OpenMP threads (torch) or a vLLM
    engine can deadlock the child. Use as a context manager or call `close()`.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, mode: str = "last_box"):
        if workers < 1 or not timeout_s > 0:
            raise ConfigError(f"answer checker needs workers >= 1 and timeout > 0, got {workers}, {timeout_s}")
        if mode not in CHECK_MODES:
            raise ConfigError(f"answer check mode must be one of {list(CHECK_MODES)}, got {mode!r}")
        self.workers, self.timeout_s, self.mode = workers, timeout_s, mode
        self.counts: Counter = Counter()  # cumulative statuses, for the run's metrics
        self.restarts = 0                 # workers killed for overrunning an item
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: list[_Worker] = []

    def check(self, completions: list[str], golds: list[str]) -> list[Verdict]:
        """One Verdict per completion against the gold answer at the same position: its last boxed answer
        (mode 'last_box'), or the seed's parse of the whole completion (mode 'seed_parse')."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        if self.mode == "seed_parse":
            fn, items = _check_whole, list(zip(completions, golds))
        else:
            fn, items = _check_one, [(extract_boxed(text), gold) for text, gold in zip(completions, golds)]
        out = []
        for result in self._map(fn, items):
            status, correct = {_TIMEOUT: ("timeout", None), _ERROR: ("error", None)}.get(result, result)
            self.counts[status] += 1
            out.append(Verdict(correct, status))
        return out

    def gold_answers(self, values: list[object]) -> list[tuple[str | None, str | None]]:
        """Per raw gold value (any JSON type): (text, None) when usable, else (None, the skip reason)."""
        out = [gold_answer_text(v) for v in values]
        todo = [i for i, (_, reason) in enumerate(out) if reason is None]
        parsed = self._map(_gold_problem, [out[i][0] for i in todo])
        for i, problem in zip(todo, parsed):
            problem = {_TIMEOUT: "gold answer check timed out", _ERROR: "gold answer math-verify cannot parse"
                       }.get(problem, problem)
            if problem is not None:
                out[i] = (None, problem)
        return out

    def _map(self, fn: Callable, items: list) -> list:
        """fn over items in the workers: each result, or _TIMEOUT / _ERROR for an item that overran or crashed."""
        if not items:
            return []
        results: list = [None] * len(items)
        todo = deque(range(len(items)))
        try:
            while len(self._pool) < self.workers:
                self._pool.append(_Worker(self._ctx))
            while todo or any(w.index is not None for w in self._pool):
                for w in list(self._pool):
                    if w.ready and w.index is None and todo:
                        self._dispatch(w, fn, items, todo)
                self._collect(results)
        except BaseException:  # an interrupted batch leaves workers mid-item: start clean next time
            self.close()
            raise
        return results

    def _dispatch(self, w: _Worker, fn: Callable, items: list, todo: deque) -> None:
        """Hand the next item to an idle worker; one that died while idle is replaced and the item waits."""
        index = todo.popleft()
        try:
            w.conn.send((fn, items[index], self.timeout_s))
        except OSError:
            todo.appendleft(index)
            self._replace(w)
            return
        w.index, w.deadline = index, time.monotonic() + self.timeout_s + KILL_GRACE_S

    def _collect(self, results: list) -> None:
        """Wait for the next message or deadline; store finished items; replace dead and overrunning workers."""
        limits = [w.deadline if w.index is not None else w.started + WORKER_START_LIMIT_S
                  for w in self._pool if w.index is not None or not w.ready]  # idle workers have no deadline
        by_conn = {w.conn: w for w in self._pool}
        for conn in wait(list(by_conn), max(0.0, min(limits, default=time.monotonic()) - time.monotonic())):
            w = by_conn[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the worker died (out of memory, a crash in C code)
                if not w.ready:
                    raise RuntimeError(f"an answer-checker worker exited while starting (exit code "
                                       f"{w.process.exitcode}); check that math-verify imports") from None
                if w.index is not None:
                    results[w.index] = _ERROR
                self._replace(w)
                continue
            if w.ready:
                results[w.index], w.index = message, None
            else:
                w.ready = message == _READY
        now = time.monotonic()
        for w in list(self._pool):
            if w.index is not None and now >= w.deadline:
                results[w.index] = _TIMEOUT
                self._replace(w)
                self.restarts += 1
            elif not w.ready and now >= w.started + WORKER_START_LIMIT_S:
                raise RuntimeError(f"an answer-checker worker did not start within {WORKER_START_LIMIT_S:.0f} s")

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._pool[self._pool.index(worker)] = _Worker(self._ctx)

    def close(self) -> None:
        for w in self._pool:
            w.kill()
        self._pool = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
