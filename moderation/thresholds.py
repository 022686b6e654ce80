"""Per-category score thresholds: the known OpenAI moderation categories, parsing of the
"sexual=0.2,violence=0.5" command-line form, and validation of a thresholds mapping.

A threshold flags a text when that category's score is >= the threshold, even if OpenAI's own
flag for it is false. Unknown category names are rejected so a typo cannot silently switch a
threshold off.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Mapping

# The category names the moderation API uses (omni-moderation), in the order we report them.
CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def validate_thresholds(thresholds: Mapping[str, float] | None) -> Mapping[str, float]:
    """Return a read-only copy of `thresholds` after checking names and values (0 < score <= 1)."""
    checked: dict[str, float] = {}
    for name, value in (thresholds or {}).items():
        if name not in CATEGORIES:
            raise ValueError(
                f"Unknown moderation category {name!r} in thresholds; known categories: {', '.join(CATEGORIES)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Moderation threshold for {name!r} must be a number, got {value!r}")
        score = float(value)
        if not (math.isfinite(score) and 0.0 < score <= 1.0):
            raise ValueError(f"Moderation threshold for {name!r} must be in (0, 1], got {value!r}")
        checked[name] = score
    return MappingProxyType(checked)


def parse_thresholds(spec: str | None) -> dict[str, float]:
    """Parse "sexual=0.2,violence=0.5" into {"sexual": 0.2, "violence": 0.5}; "" gives {}."""
    parsed: dict[str, float] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, raw_value = item.partition("=")
        name, raw_value = name.strip(), raw_value.strip()
        if not sep or not name or not raw_value:
            raise ValueError(f"Bad moderation threshold {item!r}: expected CATEGORY=SCORE, e.g. 'sexual=0.2'")
        if name in parsed:
            raise ValueError(f"Moderation threshold for {name!r} is given twice")
        try:
            value = float(raw_value)
        except ValueError:
            raise ValueError(
                f"Bad moderation threshold {item!r}: {raw_value!r} is not a number (expected e.g. 'sexual=0.2')"
            ) from None
        parsed[name] = value
    return dict(validate_thresholds(parsed))
