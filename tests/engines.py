"""Test engines that implement ``engines.protocol.Engine`` without a model: they record every prompt they
receive and stream a scripted reply, so tests can assert what reached (or never reached) a model; and a
moderator that flags one word (``WordModerator``) for service tests without any server."""

from __future__ import annotations

import threading
import time

from vicuna_demo.engines.protocol import EngineError, Prompt, ReplyStats, SamplingParams


class ScriptedReply:
    def __init__(self, chunks, delay_s, fail_after=None, max_tokens=None):
        self.stats = ReplyStats()
        self._chunks, self._delay, self._fail_after = list(chunks), delay_s, fail_after
        self._max_tokens = max_tokens
        self._cancelled = threading.Event()
        self.cancelled_at: float | None = None     # time.monotonic() of the first cancel
        self.ended = threading.Event()            # the request is over (however it ended)

    def cancel(self):
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        self._cancelled.set()

    def __iter__(self):
        try:
            yield from self._words()
        finally:
            self.ended.set()

    def _words(self):
        start = time.perf_counter()
        for i, chunk in enumerate(self._chunks):
            if self._max_tokens is not None and i >= self._max_tokens:
                self.stats.finish_reason = "length"
                return
            if self._cancelled.wait(self._delay):
                self.stats.finish_reason = "cancelled"
                return
            if self._fail_after is not None and i >= self._fail_after:
                self.stats.finish_reason = "error"
                raise EngineError("Generation failed: injected fault")
            now = time.perf_counter()
            if self.stats.ttft_s is None:
                self.stats.ttft_s, first = now - start, now
            self.stats.n_tokens += 1
            self.stats.decode_s = now - start - self.stats.ttft_s
            yield chunk
        self.stats.finish_reason = "stop"


class RecordingEngine:
    """Streams ``reply`` word by word and records the messages of every request it receives. Implements the
    whole ``Engine`` interface (tests/test_engine_interface.py checks), so services never need a fallback for a fake."""

    template_name = "recording"
    default_system = "You are a test assistant."
    capacity = ""
    defaults = SamplingParams()                # a model that recommends nothing, on a GPU
    unsupported_params: frozenset[str] = frozenset()
    ready = True
    continues_replies = False

    @property
    def status(self) -> str:
        return f"{self.name}: ready"

    def warmup(self, progress=lambda message: None, background: bool = False, timeout_s: float = 0.0) -> float:
        return 0.0

    def __init__(self, name="Recorder", reply="Hello from the recording engine.", delay_s=0.01, fail_after=None,
                 defaults: SamplingParams | None = None):
        self.name, self.reply, self.delay_s, self.fail_after = name, reply, delay_s, fail_after
        if defaults is not None:
            self.defaults = defaults
        self.received: list[list[dict]] = []
        self._lock = threading.Lock()

    def prepare(self, messages, params):
        return Prompt(messages=tuple(messages), payload=list(messages))

    def stream(self, prompt, params):
        with self._lock:
            self.received.append([dict(m) for m in prompt.payload])
        words = self.reply.split(" ")
        chunks = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        return ScriptedReply(chunks, self.delay_s, self.fail_after)

    def texts(self) -> list[str]:
        """Every message content this engine has seen."""
        return [m["content"] for request in self.received for m in request]

    def close(self):
        pass


class TokenLimitEngine(RecordingEngine):
    """A recording engine that writes one word per token and stops at the request's max_new_tokens (finish reason
    "length"); given messages that end with a partial reply, it goes on after the words already there, as a
    model continuing its own turn does."""

    continues_replies = True

    def stream(self, prompt, params):
        with self._lock:
            self.received.append([dict(m) for m in prompt.payload])
        words = self.reply.split(" ")
        chunks = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        last = prompt.payload[-1]
        done = len(last["content"].split()) if last["role"] == "assistant" else 0
        return ScriptedReply(chunks[done:], self.delay_s, self.fail_after, max_tokens=params.max_new_tokens)


class SlowEngine(RecordingEngine):
    """A recording engine whose replies take ``delay_s`` per word (a long reply, slowly) and that keeps every
    request it was given (``replies``: each records when it was cancelled and sets ``ended`` when its work is
    over), so a test can see that Stop really ended the work on the engine."""

    def __init__(self, name="Slow", reply=" ".join(["word"] * 200), delay_s=0.5):
        super().__init__(name, reply, delay_s)
        self.replies: list[ScriptedReply] = []
        self.started = threading.Event()

    def stream(self, prompt, params):
        reply = super().stream(prompt, params)
        with self._lock:
            self.replies.append(reply)
        self.started.set()
        return reply

    def all_ended(self, timeout: float) -> bool:
        """True when every request given so far has ended within ``timeout`` seconds from now."""
        deadline = time.monotonic() + timeout
        return all(r.ended.wait(max(0.0, deadline - time.monotonic())) for r in list(self.replies))


class WordModerator:
    """A moderator that flags texts containing ``word``; records every text it checks. With ``hold`` (a
    threading.Event), each check waits for it, so a test can act while moderation is under way."""

    enabled = True

    def __init__(self, word: str = "nitroglow", hold: threading.Event | None = None):
        self.word, self.hold = word, hold
        self.seen: list[str] = []
        self.checking = threading.Event()

    def check(self, text: str):
        from moderation import ModerationResult
        self.seen.append(text)
        self.checking.set()
        if self.hold is not None:
            self.hold.wait(10)
        return ModerationResult.flagged(["violence"]) if self.word in text else ModerationResult.passed()

    def describe(self) -> str:
        return f"test moderator flagging {self.word!r}"
