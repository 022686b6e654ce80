"""Style features of a battle, for style-controlled ratings (pure functions, no I/O).

LMArena's style control fits, beside each model's rating, how much a battle's outcome follows the
difference in the two answers' style. A battle's style is four counts per side, over every assistant
reply of its conversation, with fenced code blocks removed before the markdown is counted:

- ``sum_assistant_tokens``: the answer's length in tokens (the engine's own count when the store has
  it; otherwise ``count_tokens``, a word-and-punctuation estimate: only the ratio of the two sides
  enters the feature, so the tokenizer matters little);
- ``header_count``: markdown headers (``#`` to ``######`` at the start of a line);
- ``list_count``: list items (``-``, ``*``, ``+`` or ``1.`` at the start of a line);
- ``bold_count``: bold spans (``**...**`` or ``__...__`` on one line).

The feature of a count is ``(a - b) / (a + b)`` (0 when both are 0), so it lies in [-1, 1] whatever the
answers' absolute length; each feature is then normalised over the battles being rated (mean 0,
standard deviation 1; a constant feature stays 0). ``STYLE_FEATURES`` fixes their order.

FastChat's clean-battle export carries the counts in ``conv_metadata`` (``sum_assistant_a_tokens``,
``header_count_a: {"h1": .., .., "h6": ..}``, ``list_count_a: {"ordered": .., "unordered": ..}``,
``bold_count_a: {"**": .., "__": ..}`` and their ``_b`` twins); ``conv_metadata`` writes that shape and
``counts_from_metadata`` reads it back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STYLE_FEATURES = ("sum_assistant_tokens", "header_count", "list_count", "bold_count")

_CODE_BLOCK = re.compile(r"```.*?(```|\Z)", re.DOTALL)  # an unclosed fence runs to the end of the text
_HEADER = re.compile(r"^(#{1,6})[ \t]", re.MULTILINE)
_ORDERED = re.compile(r"^[ \t]*\d+\.[ \t]", re.MULTILINE)
_UNORDERED = re.compile(r"^[ \t]*[-*+][ \t]", re.MULTILINE)
_BOLD_STARS = re.compile(r"\*\*[^*\n]+\*\*")
_BOLD_UNDERSCORES = re.compile(r"__[^_\n]+__")
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class StyleCounts:
    """One side's style: tokens, headers per level (h1..h6), ordered/unordered list items, bold spans."""

    tokens: int = 0
    headers: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    ordered: int = 0
    unordered: int = 0
    bold_stars: int = 0
    bold_underscores: int = 0

    def vector(self) -> tuple[int, int, int, int]:
        """The four counts in ``STYLE_FEATURES`` order."""
        return (self.tokens, sum(self.headers), self.ordered + self.unordered,
                self.bold_stars + self.bold_underscores)

    def __add__(self, other: StyleCounts) -> StyleCounts:
        return StyleCounts(self.tokens + other.tokens, tuple(x + y for x, y in zip(self.headers, other.headers)),
                           self.ordered + other.ordered, self.unordered + other.unordered,
                           self.bold_stars + other.bold_stars, self.bold_underscores + other.bold_underscores)


def count_tokens(text: str) -> int:
    """A tokenizer-free length: words and punctuation marks."""
    return len(_TOKEN.findall(text or ""))


def without_code(text: str) -> str:
    """The text with its fenced code blocks removed."""
    return _CODE_BLOCK.sub("", text or "")


def count_style(text: str, tokens: int | None = None) -> StyleCounts:
    """The style counts of one answer; ``tokens`` (the engine's count) replaces the estimate when given."""
    text = text or ""
    prose = _CODE_BLOCK.sub("", text)
    levels = [len(m.group(1)) for m in _HEADER.finditer(prose)]
    return StyleCounts(
        tokens=count_tokens(text) if tokens is None else int(tokens),
        headers=tuple(levels.count(level) for level in range(1, 7)),
        ordered=len(_ORDERED.findall(prose)),
        unordered=len(_UNORDERED.findall(prose)),
        bold_stars=len(_BOLD_STARS.findall(prose)),
        bold_underscores=len(_BOLD_UNDERSCORES.findall(prose)),
    )


def count_replies(replies: Iterable[tuple[str, int | None]]) -> StyleCounts:
    """Sum of ``count_style`` over a conversation's answers, given as (reply, tokens or None)."""
    total = StyleCounts()
    for reply, tokens in replies:
        total = total + count_style(reply, tokens)
    return total


def counts_from_conversation(messages: Sequence[Mapping]) -> StyleCounts:
    """The counts of a FastChat ``conversation_a`` / ``conversation_b`` (messages with role and content)."""
    from .records import content_text

    return count_replies((content_text(m.get("content")), None) for m in messages
                         if isinstance(m, Mapping) and m.get("role") in ("assistant", "gpt"))


def conv_metadata(a: StyleCounts, b: StyleCounts) -> dict:
    """Both sides' counts in FastChat's ``conv_metadata`` shape."""
    meta = {}
    for suffix, counts in (("a", a), ("b", b)):
        meta[f"sum_assistant_{suffix}_tokens"] = counts.tokens
        meta[f"header_count_{suffix}"] = {f"h{level}": n for level, n in enumerate(counts.headers, start=1)}
        meta[f"list_count_{suffix}"] = {"ordered": counts.ordered, "unordered": counts.unordered}
        meta[f"bold_count_{suffix}"] = {"**": counts.bold_stars, "__": counts.bold_underscores}
    return meta


def counts_from_metadata(meta: Mapping) -> tuple[StyleCounts, StyleCounts] | None:
    """(side A, side B) from a ``conv_metadata`` object, or None when it lacks a count or one is not a number."""
    def number(value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(value)
        return int(value)

    def side(suffix: str) -> StyleCounts:
        headers, lists, bold = (meta[f"{k}_count_{suffix}"] for k in ("header", "list", "bold"))
        return StyleCounts(tokens=number(meta[f"sum_assistant_{suffix}_tokens"]),
                           headers=tuple(number(headers.get(f"h{level}", 0)) for level in range(1, 7)),
                           ordered=number(lists.get("ordered", 0)), unordered=number(lists.get("unordered", 0)),
                           bold_stars=number(bold.get("**", 0)), bold_underscores=number(bold.get("__", 0)))

    try:
        return side("a"), side("b")
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def vectors_from_metadata(meta: Mapping) -> tuple[tuple, tuple] | None:
    """(side A, side B) as the four counts in ``STYLE_FEATURES`` order, straight from ``conv_metadata``
    (the fast read for a leaderboard of many battles), or None when a count is missing or not a number."""
    try:
        vectors = tuple((meta[f"sum_assistant_{s}_tokens"], sum(meta[f"header_count_{s}"].values()),
                         sum(meta[f"list_count_{s}"].values()), sum(meta[f"bold_count_{s}"].values()))
                        for s in ("a", "b"))
    except (KeyError, TypeError, AttributeError):
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for v in vectors for x in v):
        return None
    return vectors


def _vector(side: StyleCounts | Sequence[float]) -> tuple:
    return side.vector() if isinstance(side, StyleCounts) else tuple(side)


def raw_features(pairs: Sequence[tuple]) -> np.ndarray:
    """(n_battles, 4): each count as (a - b) / (a + b), 0 where both are 0; not yet normalised. A side is
    a StyleCounts or its four counts (``vectors_from_metadata``)."""
    if not pairs:
        return np.zeros((0, len(STYLE_FEATURES)))
    a = np.array([_vector(p[0]) for p in pairs], dtype=float)
    b = np.array([_vector(p[1]) for p in pairs], dtype=float)
    total = a + b
    return np.where(total > 0, (a - b) / np.where(total > 0, total, 1.0), 0.0)


def normalise(features: np.ndarray) -> np.ndarray:
    """Each column to mean 0 and standard deviation 1 over the battles; a constant column becomes 0."""
    features = np.asarray(features, dtype=float)
    if len(features) == 0:
        return features
    std = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)


def style_features(pairs: Sequence[tuple]) -> np.ndarray:
    """The normalised feature matrix the style-controlled fit takes, one row per battle."""
    return normalise(raw_features(pairs))
