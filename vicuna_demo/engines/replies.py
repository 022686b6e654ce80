"""The one token -> text -> statistics loop every in-process reply runs, and the one error message it shows.

A back end hands a reply lists of new token ids; ``TokenReply`` turns them into clean text deltas
(complete UTF-8 only, stop strings cut without leaking a prefix, end-of-sequence ids dropped), fills in
``ReplyStats`` (time to first token, tokens, decode time, finish reason) and ends the request early
when a stop string appears or the consumer cancels. ``LocalReply`` (engines/local.py, tokens from the
batching back end) and ``ZeroGPUReply`` (engines/zerogpu.py, tokens from a ``spaces.GPU`` call) only
say where the tokens come from.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable, Iterator

from .protocol import EngineError, ReplyStats
from .textstream import IncrementalDecoder, StopFilter


def fail_message(error: str | None) -> str:
    """What a visitor reads when generation fails (out of memory gets its own advice)."""
    text = (error or "unknown error").strip()
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return "The model ran out of GPU memory on this request. Please retry, or shorten the conversation."
    return f"Generation failed: {text.splitlines()[0][:300] if text else 'unknown error'}"


class TokenReply:
    """One streaming reply made of token ids; iterate it once. ``cancel()`` may be called from any thread.

    Subclasses implement ``_chunks()`` (yield lists of new token ids, return when the request ended, raise
    ``EngineError`` on failure; it should return soon after ``cancelled`` is set) and may override
    ``_stop_request()`` (free the back end's slot: a stop string appeared or the consumer left) and
    ``_done()`` (clean-up that runs however the iteration ends)."""

    def __init__(self, *, tokenizer, eos_ids: Iterable[int], stop_strings: Iterable[str], max_new: int,
                 submitted: float | None = None):
        self.stats = ReplyStats()
        self._tokenizer = tokenizer
        self._eos = frozenset(eos_ids)
        self._stop_strings = tuple(stop_strings)
        self._max_new = max_new
        self._submitted = time.perf_counter() if submitted is None else submitted
        self._cancelled = threading.Event()

    # -- what subclasses provide ----------------------------------------------------------------------
    def _chunks(self) -> Iterator[list[int]]:
        raise NotImplementedError

    def _stop_request(self) -> None:
        """The reply is over before the back end finished it: let the back end drop the request."""

    def _done(self) -> None:
        """Runs once, however the iteration ends."""

    # -- the loop ---------------------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._stop_request()

    def __iter__(self) -> Iterator[str]:
        stats = self.stats
        decoder, stops = IncrementalDecoder(self._tokenizer), StopFilter(self._stop_strings)
        generated: list[int] = []
        first_at = None
        chunks = self._chunks()
        try:
            for new in chunks:
                if self._cancelled.is_set():
                    stats.finish_reason = "cancelled"
                    return
                if not new:
                    continue
                now = time.perf_counter()
                if first_at is None:
                    first_at = now
                    stats.ttft_s = now - self._submitted
                generated += new
                stats.n_tokens = len(generated)
                stats.decode_s = now - first_at
                text = stops.push(decoder.push([t for t in new if t not in self._eos]))
                if text:
                    yield text
                if stops.stopped:
                    stats.finish_reason = "stop"
                    self._stop_request()     # free the slot now, not at the token limit
                    return
            if self._cancelled.is_set():
                stats.finish_reason = "cancelled"
                return
            tail = stops.push(decoder.flush()) + stops.flush()
            if tail:
                yield tail
            ended_on_eos = bool(generated) and generated[-1] in self._eos
            stats.finish_reason = "stop" if ended_on_eos or len(generated) < self._max_new else "length"
        except EngineError as exc:
            stats.finish_reason, stats.error = "error", str(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. spaces reports worker failures as gr.Error
            stats.finish_reason = "error"
            stats.error = fail_message(f"{type(exc).__name__}: {exc}")
            raise EngineError(stats.error) from exc
        finally:
            if stats.finish_reason is None:  # the consumer went away (closed generator)
                stats.finish_reason = "cancelled"
                self._stop_request()
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            self._done()
