"""Marking the tokenizer's own tokens inside visitor text, so the encoder can spell them as text.

A tokenizer turns the text of each of its added tokens (`<|im_end|>`, `</s>`, `[INST]`, ...) into
that token's id wherever it appears. In a prompt only the template may write them: text a visitor
typed must stay text. So, before a template lays out the turns, every occurrence of a control
token in caller-supplied content is wrapped in two private-use characters (`PLAIN_START` ...
`PLAIN_END`); `split_marked` then cuts the rendered prompt into segments `(text, plain)`, where
`plain=True` segments are such visitor-typed token texts that must be encoded with the tokenizer's
special-token parsing off. Everything else is encoded as one ordinary string would be, so a
prompt without typed tokens gets exactly the ids it always had.

This is the same rule as transformers' `apply_chat_template(..., sanitize_control_tokens=True)`
(which also marks with plane-15 private-use characters), applied to every template here, with
every added token of the tokenizer, special or not, counted as a control token. Marker
characters a visitor types are deleted, so markers cannot be forged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PLAIN_START = "\U000f0000"
PLAIN_END = "\U000f0001"
_MARKERS = re.compile(f"[{PLAIN_START}{PLAIN_END}]")


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The text of every added token of `tokenizer`, special or not; whitespace-only ones left out.

    Whitespace tokens (some vocabularies add `"\\n\\n"` or runs of spaces) are ordinary text: a
    visitor typing a blank line should get the ids any text with a blank line gets."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = [getattr(token, "content", str(token)) for token in decoder.values()]
    texts += list(getattr(tokenizer, "all_special_tokens", None) or ())
    kept = (t for t in texts if isinstance(t, str) and t.strip() and not _MARKERS.search(t))
    return tuple(dict.fromkeys(kept))


def control_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching any of `tokens`, longest first (as a tokenizer's added vocabulary
    matches), or None when there are none."""
    longest_first = sorted(set(tokens), key=len, reverse=True)
    if not longest_first:
        return None
    return re.compile("|".join(re.escape(token) for token in longest_first))


def strip_markers(text: str) -> str:
    """`text` without marker characters (a visitor cannot forge a mark)."""
    return _MARKERS.sub("", text)


def mark_plain(text: str, pattern: re.Pattern[str] | None) -> str:
    """Wrap every control token in `text` in the plain-text markers."""
    text = strip_markers(text)
    if pattern is None:
        return text
    return pattern.sub(lambda m: f"{PLAIN_START}{m.group(0)}{PLAIN_END}", text)


def split_marked(prompt: str) -> tuple[tuple[str, bool], ...]:
    """Cut a rendered prompt into `(text, plain)` segments at the markers, dropping the markers.

    A well-formed mark gives one `plain=True` segment. A lone marker (a jinja template that
    split or sliced a message) is dropped but still ends the segment, so the text on either
    side of it cannot join into a token."""
    segments: list[tuple[str, bool]] = []
    position = 0
    while position < len(prompt):
        start = prompt.find(PLAIN_START, position)
        stray = _MARKERS.search(prompt, position)
        if stray is None:
            segments.append((prompt[position:], False))
            break
        if stray.start() > position:
            segments.append((prompt[position:stray.start()], False))
        end = prompt.find(PLAIN_END, start + 1) if start == stray.start() else -1
        inner = prompt[start + 1:end] if end >= 0 else ""
        if end >= 0 and not _MARKERS.search(inner):
            if inner:
                segments.append((inner, True))
            position = end + 1
        else:  # a lone marker: drop it, the segment ends here
            position = stray.start() + 1
    return tuple(segments)
