"""Neutralising user text so it cannot forge template syntax.

A template declares `reserved` strings: role markers (`USER:`), separators (`###`) and the
text of special tokens (`</s>`, `<|im_end|>`). Before a message is rendered, every place where
a reserved string starts gets a U+200B ZERO WIDTH SPACE inserted after its first character:
`</s>` becomes `<\u200b/s>` and `USER:` becomes `U\u200bSER:`. The text still reads the same,
but no reserved string survives in it, so it can neither be parsed as a turn boundary nor be
tokenised as a special token. Matching is exact and case-sensitive.

Why no reserved string survives: a reserved string is at least two characters long and has no
U+200B in it; any occurrence in the output would be a stretch of the input where that string
starts, and a U+200B was inserted right after its first character.
"""

import re
from collections.abc import Iterable

ZWSP = "\u200b"


def check_reserved(reserved: Iterable[str]) -> tuple[str, ...]:
    """Return `reserved` as a tuple, refusing strings that neutralising cannot break."""
    checked = tuple(reserved)
    for marker in checked:
        if not isinstance(marker, str) or len(marker) < 2 or ZWSP in marker:
            raise ValueError(
                f"reserved string {marker!r} must be a str of at least 2 characters "
                "without U+200B"
            )
    return checked


def reserved_pattern(reserved: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching (zero-width) every position where a reserved string starts."""
    markers = sorted(set(reserved), key=len, reverse=True)
    if not markers:
        return None
    return re.compile("(?=" + "|".join(re.escape(m) for m in markers) + ")")


def neutralise_with(pattern: re.Pattern[str] | None, text: str) -> str:
    """Insert U+200B after the first character of every reserved string found by `pattern`."""
    if pattern is None:
        return text
    starts = [m.start() for m in pattern.finditer(text)]
    if not starts:
        return text
    pieces = []
    previous = 0
    for start in starts:
        pieces.append(text[previous : start + 1])
        pieces.append(ZWSP)
        previous = start + 1
    pieces.append(text[previous:])
    return "".join(pieces)


def neutralise(text: str, reserved: Iterable[str]) -> str:
    """Neutralise `text` against `reserved` (see the module docstring)."""
    return neutralise_with(reserved_pattern(check_reserved(reserved)), text)
