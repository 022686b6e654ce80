"""How fast each model has been answering in this app: the measured decode speeds an estimate is made from.

    speeds = SpeedBook()
    speeds.record_reply("Vicuna-7B", reply.stats)                # a visitor's reply (ChatService logs each one)
    speeds.record_batch("Vicuna-7B", tokens=9000, seconds=60, streams=4)   # an evaluation's answers, all at once
    speeds.reply_speed("Vicuna-7B")     # -> Measured(tok_s=14.2, samples=5) per stream, or None
    speeds.batch_speed("Vicuna-7B", 4)  # -> Measured(tok_s=31.0, samples=1, streams=4) all streams together
    speeds.stream_speed("Vicuna-7B")    # -> Measured(tok_s=7.75, samples=1) one stream's share of a batch

Two kinds of figure, kept apart because they answer different questions: a reply's speed is one stream's
(tokens after the first / decode time, ``ReplyStats.tok_s``), however many other visitors shared the
engine then; an evaluation's is the aggregate of the streams it ran at once (its answers' tokens / its
answer time), which is what the next evaluation at the same batch will see. Only recent figures are kept
(the engine, its load and the model's device can change); nothing here is stored. Thread-safe.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass

RECENT = 20               # figures kept per model and kind
MIN_REPLY_TOKENS = 8      # shorter replies say more about the first token than about decoding


@dataclass(frozen=True)
class Measured:
    tok_s: float          # the median of the recent figures
    samples: int          # how many figures
    streams: int = 1      # streams at once (an evaluation's batch); 1 for a visitor's reply


class SpeedBook:
    def __init__(self):
        self._replies: dict[str, deque] = {}
        self._batches: dict[str, deque] = {}
        self._lock = threading.Lock()

    def record_reply(self, model: str, stats) -> None:
        """One finished reply's ``ReplyStats`` (too short or without a decode time: ignored)."""
        tok_s = getattr(stats, "tok_s", None)
        if tok_s is None or tok_s <= 0 or (getattr(stats, "n_tokens", 0) or 0) < MIN_REPLY_TOKENS:
            return
        with self._lock:
            self._replies.setdefault(model, deque(maxlen=RECENT)).append(float(tok_s))

    def record_batch(self, model: str, *, tokens: int, seconds: float, streams: int) -> None:
        """``tokens`` a model generated in ``seconds`` with ``streams`` requests at once (an evaluation's answers)."""
        if tokens < MIN_REPLY_TOKENS or seconds <= 0 or streams < 1:
            return
        with self._lock:
            self._batches.setdefault(model, deque(maxlen=RECENT)).append((tokens / seconds, int(streams)))

    def reply_speed(self, model: str) -> Measured | None:
        with self._lock:
            figures = list(self._replies.get(model, ()))
        return Measured(statistics.median(figures), len(figures)) if figures else None

    def batch_speed(self, model: str, streams: int | None = None) -> Measured | None:
        """The model's evaluation figures (those at ``streams`` at once when given), or None."""
        with self._lock:
            figures = [(s, n) for s, n in self._batches.get(model, ()) if streams is None or n == streams]
        if not figures:
            return None
        return Measured(statistics.median(s for s, _ in figures), len(figures), figures[-1][1])

    def stream_speed(self, model: str) -> Measured | None:
        """One stream's share of the model's evaluation figures, whatever their batch (tok/s over streams), or None:
        for an estimate at a batch no evaluation ran with yet."""
        with self._lock:
            figures = [s / n for s, n in self._batches.get(model, ())]
        return Measured(statistics.median(figures), len(figures)) if figures else None
