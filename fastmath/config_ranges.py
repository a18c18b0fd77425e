"""Numeric ranges of config fields, and the one check that applies them.

Each numeric field states its range where it is declared, `_opt(..., range="[0, 1)")` in fastmath/config.py, with
`why=` where the range alone does not say why a bound is there. A value outside its natural domain (a beta of
1.5, a timeout of 0, a group of one completion) is refused when the config loads, with the key and the allowed
range named, instead of failing in torch or in a worker pool minutes later, or training on nothing. Every int and
float (and each item of a list of numbers) must also be finite. `tests/test_config.py` checks that every numeric
field has a range (`finite` where every finite value means something: signed reward values and weights) and that
no other field has one.

Ranges are written as intervals, `[0, 1)`, as one-sided bounds, `>= 1`, `> 0`, or as `finite`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from fastmath.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        if text == "finite":
            return cls(-math.inf, math.inf, False, False, text)
        one_sided = re.fullmatch(r"(>=|>)\s*(\S+)", text)
        if one_sided:
            return cls(float(one_sided[2]), math.inf, one_sided[1] == ">=", False, text)
        both = re.fullmatch(r"([\[(])\s*([^,]+),\s*([^\])]+)([\])])", text)
        if not both:
            raise ValueError(f"not a range: {text!r}")
        return cls(float(both[2]), float(both[3]), both[1] == "[", both[4] == "]", text)

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self) -> str:
        return self.text if self.high == math.inf else f"in {self.text}"


def check_ranges(settings: Iterable[tuple[str, Any, Any]]) -> None:
    """Raise ConfigError naming the first numeric value that is not finite or outside its field's range.

    `settings`: (dotted key, dataclass field, value) of every setting (fastmath.config.leaf_fields); a field's
    metadata holds its Interval under "range" and the reason for it under "why"."""
    for key, f, value in settings:
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if not isinstance(item, (int, float)) or isinstance(item, bool):
                continue
            shown = key if i is None else f"{key}[{i}]"
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"config key '{shown}' must be a finite number, got {item}")
            interval = f.metadata.get("range")
            if interval is not None and item not in interval:
                why = f.metadata.get("why")
                reason = f" ({why})" if why else ""
                raise ConfigError(f"config key '{shown}' must be {interval.describe()}, got {item}{reason}")
