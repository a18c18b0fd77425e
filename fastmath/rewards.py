"""GRPO rewards: accuracy, format, length (cosine, Kimi), overlong; their weighted sum.

Every reward is a plain function `(prompts, completions, answers, **columns) -> list[float]`, one value per
completion. The trainer calls them with these columns (all lists, one entry per completion):
    correct     True / False from the shared answer check (None when the check timed out or failed)
    length      completion length in the configured unit (tokens by default, or characters)
    tokens      completion length in tokens (whatever the unit)
    group       index of the prompt group the completion belongs to (G completions per prompt)
    truncated   True when generation stopped at max_completion_length rather than at eos / a stop string
and keyword settings from `grpo.*` (`max_length` of the cosine reward in the length unit, the cosine end points,
`limit` = the generation limit in tokens, the overlong buffer, `format_rule`, `length_span`). A user
reward can ignore what it does not need (`**columns`). Weighted sum: `grpo.reward.reward_weights`.

The `correct` column comes from `fastmath.answers.AnswerChecker` (math-verify in a worker pool with a time
limit per item), the same check the held-out check and the eval stage use.

Completions arrive judged: when the chat template's generation prompt pre-fills the reasoning opening (`<think>\n`,
DeepSeek-R1-Distill), the trainer passes that opening plus the sampled text (`fastmath.data.Formatter.judged`),
so a format rule sees the whole assistant turn whatever the template.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from fastmath.answers import extract_boxed


def accuracy_reward(prompts, completions, answers, *, correct, **columns) -> list[float]:
    """1 for a correct final boxed answer, 0 otherwise (a timed-out check counts as 0)."""
    return [1.0 if c else 0.0 for c in correct]


def box_after_think(text: str) -> bool:
    """Exactly one `<think>...</think>` block at the start (after whitespace), then a balanced `\\boxed{...}`
    after it. Substring counts and one extraction: linear in the length of the text."""
    if not text.lstrip().startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return False
    return extract_boxed(text.split("</think>", 1)[1]) is not None


def box_before_think_end(text: str) -> bool:
    """A box opened and closed before a `</think>`: the seed's format_reward2, whose pattern
    `^.*?oxed{(.*?)}.*?</think>.*?$` (DOTALL) matches exactly when some `oxed{` is followed by a `}` and that by a
    `</think>`. The earliest `oxed{`, the first `}` after it and the first `</think>` after that decide it: three
    forward searches, linear in the length of the text (the regex backtracks: quadratic on hostile input)."""
    box = text.find("oxed{")
    if box < 0:
        return False
    close = text.find("}", box + len("oxed{"))
    return close >= 0 and text.find("</think>", close + 1) >= 0


FORMAT_RULES: dict[str, Callable[[str], bool]] = {
    "box_after_think": box_after_think,
    "box_before_think_end": box_before_think_end,
}


def format_ok(text: str, rule: str = "box_after_think") -> bool:
    """Whether a judged completion has the format `rule` (a FORMAT_RULES name) checks."""
    return FORMAT_RULES[rule](text)


def format_reward(prompts, completions, answers, *, format_rule: str = "box_after_think", **columns) -> list[float]:
    """1 when the completion has the format `grpo.reward.format_rule` names (FORMAT_RULES), else 0."""
    check = FORMAT_RULES[format_rule]
    return [1.0 if check(text) else 0.0 for text in completions]


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


def kimi_length_reward(prompts, completions, answers, *, correct, length, group, length_span: str = "group",
                       **columns) -> list[float]:
    """Kimi k1.5's length penalty: lambda = 0.5 - (L - Lmin) / (Lmax - Lmin); a correct completion gets lambda, a
    wrong one min(0, lambda) (long wrong answers are penalised, short wrong ones are not rewarded). Lmin and Lmax
    are taken per prompt group (`length_span` 'group'), or over every completion of the call ('rank_batch': the
    seed's len_reward, called on one rank's 2 prompts x 8 completions, so its scale follows the GPU count). A
    span whose completions all have one length gives 0."""
    if length_span == "rank_batch":
        group = [0] * len(length)
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
