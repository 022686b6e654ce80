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
    """Pass text through until a stop string appears; never emit a partial stop string."""

    def __init__(self, stop_strings: Sequence[str]):
        self._stops = tuple(s for s in stop_strings if s)
        self._held = ""          # text not yet emitted: it may be the start of a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self._held += text
        cut = min((i for i in (self._held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = self._longest_partial_suffix(self._held)
        out = self._held[:len(self._held) - keep]
        self._held = self._held[len(self._held) - keep:]
        return out

    def flush(self) -> str:
        """The generation ended without a stop string: the held text was real output."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _longest_partial_suffix(self, text: str) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
