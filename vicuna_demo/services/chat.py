"""One chat turn, whatever the tab: check the input, moderate it, stream the reply, log it.

``ChatService.turn`` is the whole of a visitor's event, one call, in this order:

    gate (one generating event per session) -> sanitize -> limits (empty, too long, turns, rate)
    -> unknown model -> messages (a frozen snapshot) -> moderation of exactly the new text in that
    snapshot -> engine -> log

The messages are built once, before the moderation check, and never read again from the session, so
what reaches the model is exactly what was moderated, even when a second event of the same visitor
arrives meanwhile (it is refused by the gate anyway). A flagged message is logged as flagged and never
enters a later turn's context. ``ChatService.reply`` streams one reply for a snapshot already checked:
``turn`` and the battle service (services/battle.py) use it, and it hands the text to the engine through the one
path the judge and evaluations use too (``Dispatcher.send``, engines/dispatch.py: sampling, cancel, timeout).

The same event at another point of the conversation, through the same gate and checks: ``regenerate``
(the last message again), ``edit`` (a changed earlier message; the conversation is cut after it) and
``continue_reply`` (the model goes on with a reply the token limit cut). ``resume`` finds a visitor's
conversation again after a page reload by its key alone (``session.ConversationKeeper``).

    service = ChatService(engines, moderator, store, limits=Limits(), flags={"temperature": 0.5})
    session = ChatSession()
    for update in service.turn(session, "Hello", model="Vicuna-7B", system=None, client="hash"):
        print(update.status, update.reply)       # session.exchanges[-1] is kept in step
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

from moderation import ModerationResult, Moderator

from ..engines.dispatch import Dispatcher
from ..engines.protocol import (MAX_NEW_TOKENS_RANGE, REPETITION_PENALTY_RANGE, SAMPLING_FIELDS,  # noqa: F401
                                TEMPERATURE_RANGE, TOP_P_RANGE, Engine, EngineError, PromptTooLong, ReplyStats,
                                SamplingParams)
from ..data.shared import SharedRateLimiter
from ..data.storage import StoreUnavailable, TurnRecord
from .session import (BUSY_NOTICE, CancelToken, ChatSession, ConversationKeeper, Exchange,  # noqa: F401
                      messages_for, new_id)
from .speed import SpeedBook

log = logging.getLogger("vicuna_demo.services.chat")

OUTPUT_FLAGGED_NOTICE = ("This reply was withdrawn: the content moderation check flagged it ({categories}). "
                         "Please try a different question.")
NOTHING_TO_REGENERATE = "There is no reply to regenerate yet."
NOT_A_MESSAGE = "That message is no longer in this conversation."
NOTHING_TO_CONTINUE = "There is no reply cut at the token limit to continue."
CANNOT_CONTINUE = ("{model} cannot continue a reply (its server's chat API has no way to); press Regenerate "
                   "with a higher Max output tokens instead.")


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = 12000
    max_turns: int = 50
    rate_limit_per_min: int = 30          # 0 = unlimited
    max_new_tokens_cap: int = 2048        # no request may ask for more new tokens (--max-new-tokens-limit)


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


NOT_SAVED_NOTICE = "⚠️ This reply could not be saved (the database is unreachable); it is not in the log."


def rate_limiter_for(store, bucket: str, per_minute: int):
    """A RateLimiter in this process, or one counted in the store when replicas share it (data/shared.py)."""
    if getattr(store, "shared", False):
        return SharedRateLimiter(store, bucket, per_minute)
    return RateLimiter(per_minute)


@dataclass
class TurnUpdate:
    """What the UI shows while a turn runs; the last update has ``done=True``."""

    reply: str = ""
    done: bool = False
    # streaming | done | error | moderated | cancelled | rejected (the prompt cannot fit) | refused (nothing
    # was sent: busy, a limit, an unknown model; the session is unchanged and ``notice`` says why)
    status: str = "streaming"
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
                 moderate_output: bool = False, defaults: SamplingParams | None = None,
                 flags: Mapping[str, float | int] | None = None):
        self.engines = dict(engines)
        self.moderator = moderator
        self.store = store
        self.limits = limits
        self.moderate_output = moderate_output
        # what a request for no model (or an unknown one) starts from; each engine has its own (Engine.defaults)
        self.defaults = defaults or SamplingParams()
        # the sampling flags the user gave (Settings.sampling_flags): over every model's own defaults
        self.flags = {k: v for k, v in (flags or {}).items() if v is not None}
        # the one path from text to an engine, shared with the judge and evaluations (engines/dispatch.py)
        self.dispatcher = Dispatcher(self.engines, moderate=moderator.check, flags=self.flags,
                                     fallback=self.defaults, max_new_tokens_cap=limits.max_new_tokens_cap)
        self.rate_limiter = rate_limiter_for(store, "chat", limits.rate_limit_per_min)
        self.kept = ConversationKeeper()   # conversations a page reload finds again (``resume``)
        self.speeds = SpeedBook()          # each model's measured speed, from the replies logged (``_log``)

    # -- checks -----------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(self.engines)

    def check_model(self, name) -> str:
        """'' when ``name`` is a loaded model, else the reason to show the user (the one "unknown model" check)."""
        if isinstance(name, str) and name in self.engines:
            return ""
        return f"Unknown model {name!r}; choose one of: {', '.join(self.engines)}."

    def default_system(self, model: str) -> str:
        """The model's own default system prompt ('' for an unknown model)."""
        engine = self.engines.get(model)
        return engine.default_system if engine is not None else ""

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

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The range a visitor may choose from, per SamplingParams field (the reply length ends at the cap)."""
        return {"temperature": TEMPERATURE_RANGE, "top_p": TOP_P_RANGE,
                "max_new_tokens": (MAX_NEW_TOKENS_RANGE[0], self.limits.max_new_tokens_cap),
                "repetition_penalty": REPETITION_PENALTY_RANGE}

    def defaults_for(self, model: str | None) -> SamplingParams:
        """What ``model`` uses for a value a request leaves out: its engine's defaults (the model's recommended
        values, a reply length suited to its device) with the user's flags over them, the reply length capped.
        A field the engine cannot apply keeps the built-in value. An unknown model (or None): the service's."""
        return self.dispatcher.defaults_for(model)

    def unsupported(self, model: str | None) -> frozenset[str]:
        """SamplingParams fields ``model``'s engine cannot apply (the page greys their sliders out)."""
        return self.dispatcher.unsupported(model)

    def params(self, temperature=None, top_p=None, max_new_tokens=None, repetition_penalty=None, *,
               model: str | None = None) -> SamplingParams:
        """Untrusted values -> clamped parameters; a missing (None) or non-numeric value takes ``model``'s default
        (``defaults_for``)."""
        return SamplingParams.clamped(temperature, top_p, max_new_tokens, max_tokens_cap=self.limits.max_new_tokens_cap,
                                      defaults=self.defaults_for(model), repetition_penalty=repetition_penalty)

    # -- a visitor's event ------------------------------------------------------------------------
    def turn(self, session: ChatSession, text, *, model: str, system=None, temperature=None, top_p=None,
             max_new_tokens=None, repetition_penalty=None, client: str = "unknown") -> Iterator[TurnUpdate]:
        """Send ``text`` in ``session`` and stream the reply; the whole of one visitor event.

        ``system`` None means the model's default system prompt; any text is used as given (and moderated
        with the message when it differs from the model's default). A sampling value left None takes the
        model's default (``defaults_for``). Yields ``TurnUpdate``s; the session's last exchange follows them.
        A refusal (busy, a limit, an unknown model) yields one update with ``status="refused"`` and leaves
        the session as it was."""
        raw = (temperature, top_p, max_new_tokens, repetition_penalty)
        yield from self._gated(session, lambda: self._turn(session, text, model, system, raw, client, False))

    def regenerate(self, session: ChatSession, *, model: str, system=None, temperature=None, top_p=None,
                   max_new_tokens=None, repetition_penalty=None, client: str = "unknown") -> Iterator[TurnUpdate]:
        """Ask again for the reply to the last message (checked and moderated again), replacing it."""
        raw = (temperature, top_p, max_new_tokens, repetition_penalty)
        yield from self._gated(session, lambda: self._turn(session, None, model, system, raw, client, True))

    def edit(self, session: ChatSession, index, text, *, model: str, system=None, temperature=None, top_p=None,
             max_new_tokens=None, repetition_penalty=None, client: str = "unknown") -> Iterator[TurnUpdate]:
        """Replace the visitor's message of exchange ``index`` (0 = the first) by ``text`` and answer it: the
        conversation is cut after that message. The new text is checked and moderated like a new message; a
        refusal (or an ``index`` that is no message of this conversation) leaves the session as it was."""
        raw = (temperature, top_p, max_new_tokens, repetition_penalty)
        at = index if isinstance(index, int) and not isinstance(index, bool) else -1   # -1: no message
        yield from self._gated(session, lambda: self._turn(session, text, model, system, raw, client, False,
                                                           edit_at=at))

    def continue_reply(self, session: ChatSession, *, system=None, temperature=None, top_p=None, max_new_tokens=None,
                       repetition_penalty=None, client: str = "unknown") -> Iterator[TurnUpdate]:
        """Go on with the last reply where the token limit cut it: the model that wrote it continues the same
        assistant turn (the reply grows in place; its statistics line then counts both parts). Checked like a
        new event (gate, rate limit) and moderated like Regenerate; refused when the last reply was not cut."""
        raw = (temperature, top_p, max_new_tokens, repetition_penalty)
        yield from self._gated(session, lambda: self._continue(session, system, raw, client))

    def stop(self, session: ChatSession) -> None:
        session.cancel.cancel()

    def clear(self, session: ChatSession) -> ChatSession:
        """Stop the session's reply and give the visitor a new, empty conversation (the old one is not kept)."""
        session.cancel.cancel()
        self.kept.forget(session)
        return ChatSession()

    def resume(self, key, session: ChatSession) -> ChatSession:
        """After a page reload: the conversation kept under ``key`` (what the browser stored, untrusted), else
        ``session`` (the new page's own). Only a key travels; the text never comes back from the browser."""
        return self.kept.find(key) or session

    def _gated(self, session: ChatSession, run: Callable[[], Iterator[TurnUpdate]]) -> Iterator[TurnUpdate]:
        gate = session.gate
        if not gate.begin():
            yield TurnUpdate(done=True, status="refused", notice=BUSY_NOTICE)
            return
        held = True
        try:
            for update in run():
                if update.done:  # the reply is over: the session is free when the visitor sees it
                    gate.end()
                    held = False
                yield update
        finally:
            if held:
                gate.end()

    def _turn(self, session: ChatSession, text, model, system, raw_params, client, regenerate: bool,
              edit_at=None):
        if regenerate:
            if not session.exchanges:
                yield TurnUpdate(done=True, status="refused", notice=NOTHING_TO_REGENERATE, model=model)
                return
            text, history = session.exchanges[-1].user, session.exchanges[:-1]
        elif edit_at is not None:
            if not 0 <= edit_at < len(session.exchanges):
                yield TurnUpdate(done=True, status="refused", notice=NOT_A_MESSAGE, model=model)
                return
            text, history = sanitize_input(text), session.exchanges[:edit_at]
        else:
            text, history = sanitize_input(text), list(session.exchanges)
        system = None if system is None else sanitize_input(system)
        problem = (self.check_system(system or "") or self.check_message(text, len(history), client)
                   or self.check_model(model))
        if problem:
            yield TurnUpdate(done=True, status="refused", notice=problem, model=model)
            return
        params = self.params(*raw_params, model=model)
        default = self.default_system(model)
        messages = messages_for(history, default if system is None else system, text)
        exchange = Exchange(user=text, model=model)
        session.exchanges[:] = [*history, exchange]     # a new message, a new last reply, or an edit's cut
        session.turn_counter += 1
        self.kept.keep(session)
        session.cancel.arm()  # before the first update: a Stop pressed from then on is honoured
        yield TurnUpdate(model=model)
        verdict = self.moderate(self.new_text(messages, default))
        ctx = TurnContext(conversation_id=session.conversation_id, turn_index=session.turn_counter,
                          client_hash=client)
        for update in self.reply(model, messages, params, verdict, ctx, session.cancel):
            exchange.apply(update)
            yield update

    def can_continue(self, session: ChatSession) -> bool:
        """Would ``continue_reply`` go on with the last reply (cut at the token limit, by a model that continues)?"""
        exchange = session.exchanges[-1] if session.exchanges else None
        return (exchange is not None and exchange.cut_at_limit
                and exchange.model in self.engines and self.engines[exchange.model].continues_replies)

    def _continue(self, session: ChatSession, system, raw_params, client):
        exchange = session.exchanges[-1] if session.exchanges else None
        if exchange is None or not exchange.cut_at_limit:
            yield TurnUpdate(done=True, status="refused", notice=NOTHING_TO_CONTINUE)
            return
        model, history = exchange.model, session.exchanges[:-1]
        system = None if system is None else sanitize_input(system)
        problem = (self.check_model(model) or self.check_system(system or "")
                   or self.check_message(exchange.user, len(history), client))
        if not problem and not self.engines[model].continues_replies:
            problem = CANNOT_CONTINUE.format(model=model)
        if problem:
            yield TurnUpdate(done=True, status="refused", notice=problem, model=model)
            return
        params = self.params(*raw_params, model=model)
        default = self.default_system(model)
        asked = messages_for(history, default if system is None else system, exchange.user)
        messages = (*asked, {"role": "assistant", "content": exchange.reply})
        earlier = exchange.stats
        session.turn_counter += 1
        self.kept.keep(session)
        session.cancel.arm()
        verdict = self.moderate(self.new_text(asked, default))
        ctx = TurnContext(conversation_id=session.conversation_id, turn_index=session.turn_counter,
                          client_hash=client)
        for update in self.reply(model, list(messages), params, verdict, ctx, session.cancel):
            if update.done and update.stats is not None:
                update.stats = earlier.followed_by(update.stats)
            exchange.apply(update)
            yield update

    @staticmethod
    def new_text(messages: Sequence[dict], default_system: str) -> list[str]:
        """What moderation must see in a snapshot: its last message (the visitor's), and its system prompt
        when the visitor changed it (a model's own default is not the visitor's text)."""
        texts = [messages[-1]["content"]]
        if messages[0]["role"] == "system" and messages[0]["content"] != default_system:
            texts.append(messages[0]["content"])
        return texts

    # -- a turn -----------------------------------------------------------------------------------
    def reply(self, model: str, messages: list[dict], params: SamplingParams, moderation: ModerationResult,
              ctx: TurnContext, cancel: CancelToken | None = None) -> Iterator[TurnUpdate]:
        """Stream one reply to ``messages`` (which end with the user's message, or with a partial assistant
        reply that the model continues: the updates then carry that reply and its continuation), then log
        the turn.

        ``moderation`` is the verdict on the visitor's text; a disallowed verdict never reaches the engine."""
        update = TurnUpdate(model=model)
        if messages and messages[-1].get("role") == "assistant":
            update.reply = sanitize_input(messages[-1].get("content"))
        started = time.time()
        # Whatever a tab forgot: no lone surrogates or control characters reach an engine or the log.
        messages = [{**m, "content": sanitize_input(m.get("content"))} for m in messages]
        sent_messages: Sequence[dict] = messages
        stats = ReplyStats()
        sent = None
        if not moderation.allowed:
            update.status, update.notice, update.done = "moderated", moderation.notice, True
            log.info("turn blocked by moderation (%s) model=%s", moderation.status, model)
            self._log(ctx, model, "-", params, messages, "", "moderated", stats, moderation, started)
            yield update
            return
        try:
            sent = self.dispatcher.send(model, messages, params, verdict=moderation, cancel=cancel)
            sent_messages, params, stats = sent.prompt.messages, sent.params, sent.stats
            update.notice = " ".join(sent.notices)
            yield update
            for delta in sent:
                update.reply += delta
                update.stats = stats
                yield update
        except GeneratorExit:  # the visitor went away mid-reply (tab closed, request cancelled): log what they saw
            if sent is not None:
                sent.close()                                # the engine's request ends too
            if stats.finish_reason is None:
                stats.finish_reason = "cancelled"
            self._log(ctx, model, self._template_name(model), params,
                      list(sent_messages), update.reply, stats.finish_reason, stats, moderation, started)
            raise
        except PromptTooLong as exc:
            update.status, update.notice = "rejected", str(exc)
        except EngineError as exc:
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
        if not self._log(ctx, model, self._template_name(model), params,
                         list(sent_messages), update.reply, finish, stats, moderation, started):
            update.notice = (update.notice + " " if update.notice else "") + NOT_SAVED_NOTICE
        yield update

    def _template_name(self, model: str) -> str:
        engine = self.engines.get(model)
        return engine.template_name if engine is not None else "-"

    def _log(self, ctx, model, template, params, messages, reply, finish, stats, moderation, started) -> bool:
        """Store the turn (and note its speed); False only when a shared database could not take it (the visitor is
        told)."""
        self.speeds.record_reply(model, stats)
        record = TurnRecord(
            conversation_id=ctx.conversation_id, turn_index=ctx.turn_index, tstamp=started,
            client_hash=ctx.client_hash, model=model, template=template, params=params.as_dict(),
            messages=[{"role": m["role"], "content": m["content"]} for m in messages], reply=reply,
            finish_reason=finish, n_tokens=stats.n_tokens, ttft_s=stats.ttft_s, tok_s=stats.tok_s,
            moderation=moderation.status, moderation_categories=tuple(moderation.categories),
            error=stats.error, battle_id=ctx.battle_id, side=ctx.side)
        try:
            self.store.log_turn(record)
        except StoreUnavailable:
            log.error("a turn of conversation %s could not be stored: the database is unreachable", ctx.conversation_id)
            return False
        except Exception:  # noqa: BLE001 - a logging bug must not take the visitor's reply with it
            log.exception("could not log a turn of conversation %s", ctx.conversation_id)
        return True
