"""Token ids -> clean text deltas: complete UTF-8 only, and stop strings cut without leaking a prefix.

``IncrementalDecoder`` emits text only once the bytes decode completely (no trailing U+FFFD, so a
multi-byte character split over two tokens is never shown half). ``StopFilter`` holds back the
longest tail that could still become a stop string and reports when one appears.
"""

from __future__ import annotations

from typing import Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas.

    Decoding a window that starts a few tokens back keeps SentencePiece's leading-space handling
    right, and each call costs O(window), not O(text)."""

    def __init__(self, tokenizer, context_tokens: int = 6):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0   # start of the window decoded for context
        self._read_offset = 0     # ids before this have been emitted
        self._context = context_tokens

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text that became final (possibly "")."""
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if full_text.endswith(_REPLACEMENT) or len(full_text) < len(prefix_text):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        delta = full_text[len(prefix_text):]
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - self._context)
        return delta

    def flush(self) -> str:
        """At the end, emit whatever is left (a dangling partial character becomes U+FFFD-free text)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):].rstrip(_REPLACEMENT)


class StopFilter:
    """Pass text through until a stop string appears; never emit a partial stop string.

    Text is held back from the earliest position where a stop string could still begin. When a stop
    string is complete but a longer one that starts earlier may still complete (stops ``a#`` and
    ``aa#a`` on ``aa#``), the filter waits: the earliest stop in the text wins, as in a plain search."""

    def __init__(self, stop_strings: Sequence[str]):
        self._stops = tuple(s for s in stop_strings if s)
        self._held = ""          # text not yet emitted: it may be the start of a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self._held += text
        return self._release(final=False)

    def flush(self) -> str:
        """The generation ended: the held text is real output, up to a stop string already complete in it."""
        if self.stopped:
            return ""
        out = self._release(final=True)
        out, self._held = out + self._held, ""
        return out

    def _release(self, final: bool) -> str:
        held = self._held
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        pending = len(held) if final else self._earliest_partial_start(held)
        if cut >= 0 and cut <= pending:
            self.stopped = True
            self._held = ""
            return held[:cut]
        safe = pending if cut < 0 else min(cut, pending)
        self._held = held[safe:]
        return held[:safe]

    def _earliest_partial_start(self, text: str) -> int:
        """The first index from which the rest of ``text`` is a proper prefix of a stop string (else len)."""
        longest = max((len(s) for s in self._stops), default=1)
        for i in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[i:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return i
        return len(text)
