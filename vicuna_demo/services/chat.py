"""One chat turn, whatever the tab: check the input, moderate it, fit the context, stream, log.

This is the only place where text goes to an engine, so every entry point (single chat, Regenerate,
both sides of a comparison, the anonymous arena, the API) gets the same checks in the same order:

    limits (empty, too long, too many turns, rate) -> moderation -> template + context -> engine -> log

UI code calls ``ChatService``; it never talks to an engine directly.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from moderation import ModerationResult, Moderator

from ..engines.protocol import Engine, EngineError, PromptTooLong, ReplyStats, SamplingParams
from ..data.storage import TurnRecord

log = logging.getLogger("vicuna_demo.services.chat")

OUTPUT_FLAGGED_NOTICE = ("This reply was withdrawn: the content moderation check flagged it ({categories}). "
                         "Please try a different question.")


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = 12000
    max_turns: int = 50
    rate_limit_per_min: int = 30          # 0 = unlimited
    max_new_tokens: int = 2048


class CancelToken:
    """Lets the Stop button (another gradio event) stop the reply a visitor is receiving.

    Lives in the visitor's ``gr.State``; gradio hands the same object to every event of a session."""

    def __init__(self):
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._cancelled = False

    def __deepcopy__(self, memo):  # gradio deep-copies a session's initial state: give it its own token
        return CancelToken()

    def arm(self) -> None:
        with self._lock:
            self._cancelled, self._callbacks = False, []

    def bind(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class RateLimiter:
    """Sliding one-minute window per client (thread-safe); 0 disables it."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._hits: dict[str, deque] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> float:
        """0.0 when allowed (and counted); otherwise the seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            hits = self._hits.setdefault(client, deque())
            while hits and now - hits[0] >= 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return 60.0 - (now - hits[0])
            hits.append(now)
            if len(self._hits) > 10000:  # forget idle clients
                for key in [k for k, v in self._hits.items() if not v or now - v[-1] >= 60.0]:
                    del self._hits[key]
            return 0.0


@dataclass
class TurnUpdate:
    """What the UI shows while a turn runs; the last update has ``done=True``."""

    reply: str = ""
    done: bool = False
    status: str = "streaming"      # streaming | done | error | moderated | cancelled | rejected
    notice: str = ""               # user-facing message (moderation, context dropped, errors)
    stats: ReplyStats | None = None
    model: str = ""


@dataclass
class TurnContext:
    """Where a turn belongs, for the log."""

    conversation_id: str
    turn_index: int
    client_hash: str
    battle_id: str | None = None
    side: str | None = None


def new_id() -> str:
    return uuid.uuid4().hex


def plain_text(content) -> str:
    """gradio 6 hands message content as a list of blocks; flatten it to the text the model needs."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(plain_text(block) for block in content)
    return "" if content is None else str(content)


def sanitize_input(text) -> str:
    """Make untrusted text safe to process: a str, no lone surrogates or NULs, no other C0 controls but tab/newline."""
    text = plain_text(text)
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    return "".join(ch for ch in text if ch in "\t\n" or not (ord(ch) < 32 or ord(ch) == 127)).replace("\r", "")


class ChatService:
    """Everything a turn needs, shared by all visitors (thread-safe; holds no visitor data)."""

    def __init__(self, engines: Mapping[str, Engine], moderator: Moderator, store, *, limits: Limits = Limits(),
                 moderate_output: bool = False):
        self.engines = dict(engines)
        self.moderator = moderator
        self.store = store
        self.limits = limits
        self.moderate_output = moderate_output
        self.rate_limiter = RateLimiter(limits.rate_limit_per_min)

    # -- checks -----------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(self.engines)

    def engine(self, name: str) -> Engine:
        try:
            return self.engines[name]
        except KeyError:
            raise KeyError(f"Unknown model {name!r}; available: {', '.join(self.engines)}.") from None

    def check_message(self, text: str, user_turns_so_far: int, client_hash: str, *, count_rate: bool = True) -> str:
        """'' when the message may be sent, else the reason to show the user."""
        if not text.strip():
            return "Please type a message first."
        if len(text) > self.limits.max_input_chars:
            return (f"Your message is {len(text):,} characters long; the limit is "
                    f"{self.limits.max_input_chars:,}. Please shorten it.")
        if user_turns_so_far >= self.limits.max_turns:
            return (f"This conversation reached the limit of {self.limits.max_turns} turns. "
                    "Press Clear to start a new one.")
        if count_rate:
            wait = self.rate_limiter.allow(client_hash)
            if wait > 0:
                return (f"You are sending messages too fast (limit: {self.limits.rate_limit_per_min} per minute). "
                        f"Please wait {wait:.0f} s.")
        return ""

    def check_system(self, text: str) -> str:
        """'' when a visitor's system prompt may be used, else the reason to show the user."""
        if len(text) > self.limits.max_input_chars:
            return (f"The system prompt is {len(text):,} characters long; the limit is "
                    f"{self.limits.max_input_chars:,}. Please shorten it.")
        return ""

    def moderate(self, texts: Sequence[str]) -> ModerationResult:
        """Check the text a visitor supplied (message, custom system prompt) as one input."""
        joined = "\n\n".join(t for t in texts if t and t.strip())
        return self.moderator.check(joined)

    def params(self, temperature, top_p, max_new_tokens) -> SamplingParams:
        return SamplingParams.clamped(temperature, top_p, max_new_tokens, max_tokens_cap=self.limits.max_new_tokens)

    # -- a turn -----------------------------------------------------------------------------------
    def reply(self, model: str, messages: list[dict], params: SamplingParams, moderation: ModerationResult,
              ctx: TurnContext, cancel: CancelToken | None = None) -> Iterator[TurnUpdate]:
        """Stream one reply to ``messages`` (which end with the user's message), then log the turn.

        ``moderation`` is the verdict on the visitor's text; a disallowed verdict never reaches the engine."""
        update = TurnUpdate(model=model)
        started = time.time()
        # Whatever a tab forgot: no lone surrogates or control characters reach an engine or the log.
        messages = [{**m, "content": sanitize_input(m.get("content"))} for m in messages]
        sent_messages: Sequence[dict] = messages
        stats = ReplyStats()
        if not moderation.allowed:
            update.status, update.notice, update.done = "moderated", moderation.notice, True
            log.info("turn blocked by moderation (%s) model=%s", moderation.status, model)
            self._log(ctx, model, "-", params, messages, "", "moderated", stats, moderation, started)
            yield update
            return
        try:
            engine = self.engine(model)
            prompt = engine.prepare(messages, params)
            sent_messages = prompt.messages
            if prompt.dropped_turns:
                update.notice = (f"The conversation was longer than {model}'s context window: the oldest "
                                 f"{prompt.dropped_turns} exchange(s) were left out (the system prompt was kept).")
            stream = engine.stream(prompt, params)
            stats = stream.stats
            if cancel is not None:
                cancel.bind(stream.cancel)
            yield update
            try:
                for delta in stream:
                    if not update.reply:
                        delta = delta.lstrip()  # "ASSISTANT:" leaves the model's first space in the reply
                        if not delta:
                            continue
                    update.reply += delta
                    update.stats = stats
                    yield update
            finally:
                if stats.finish_reason is None:
                    stream.cancel()
        except GeneratorExit:  # the visitor went away mid-reply (tab closed, request cancelled): log what they saw
            if stats.finish_reason is None:
                stats.finish_reason = "cancelled"
            self._log(ctx, model, getattr(self.engines.get(model), "template_name", "-"), params,
                      list(sent_messages), update.reply, stats.finish_reason, stats, moderation, started)
            raise
        except PromptTooLong as exc:
            update.status, update.notice = "rejected", str(exc)
        except (EngineError, KeyError) as exc:
            update.status = "error"
            update.notice = f"⚠️ {exc.args[0] if exc.args else exc}"
            stats.finish_reason, stats.error = "error", update.notice
            log.warning("turn failed model=%s: %s", model, update.notice)
        except Exception as exc:  # noqa: BLE001 - a bug must end this reply, not the worker
            update.status, update.notice = "error", "⚠️ Something went wrong while generating this reply; please retry."
            stats.finish_reason, stats.error = "error", f"{type(exc).__name__}: {exc}"
            log.exception("turn crashed model=%s", model)
        else:
            update.status = "cancelled" if stats.finish_reason == "cancelled" else "done"
            if self.moderate_output and update.reply.strip():
                verdict = self.moderator.check(update.reply)
                if not verdict.allowed and verdict.status == "flagged":
                    update.status = "moderated"
                    update.notice = OUTPUT_FLAGGED_NOTICE.format(categories=", ".join(verdict.categories))
                    update.reply = ""
                    stats.finish_reason = "moderated"
                    moderation = verdict
        update.stats, update.done = stats, True
        finish = stats.finish_reason or ("error" if update.status in ("error", "rejected") else "stop")
        self._log(ctx, model, getattr(self.engines.get(model), "template_name", "-"), params,
                  list(sent_messages), update.reply, finish, stats, moderation, started)
        yield update

    def _log(self, ctx, model, template, params, messages, reply, finish, stats, moderation, started) -> None:
        record = TurnRecord(
            conversation_id=ctx.conversation_id, turn_index=ctx.turn_index, tstamp=started,
            client_hash=ctx.client_hash, model=model, template=template, params=params.as_dict(),
            messages=[{"role": m["role"], "content": m["content"]} for m in messages], reply=reply,
            finish_reason=finish, n_tokens=stats.n_tokens, ttft_s=stats.ttft_s, tok_s=stats.tok_s,
            moderation=moderation.status, moderation_categories=tuple(moderation.categories),
            error=stats.error, battle_id=ctx.battle_id, side=ctx.side)
        try:
            self.store.log_turn(record)
        except Exception:  # noqa: BLE001 - a logging bug must not take the visitor's reply with it
            log.exception("could not log a turn of conversation %s", ctx.conversation_id)
