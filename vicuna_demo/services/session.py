"""A visitor's conversation as the services keep it: its exchanges, its Stop, its one-event gate, and the
keeper that finds it again after a page reload.

    session = ChatSession()                 # one per visitor and tab (gradio keeps it in gr.State)
    session.begin() -> True                 # the gate: a second generating event is refused while one runs
    session.exchanges[-1].reply             # what the visitor sees, kept in step while a reply streams
    messages_for(session.exchanges, "Be brief.", "Next question?")   # a frozen snapshot for the model
    keeper.find(session.resume_key) -> session   # ConversationKeeper: a page reload finds it again

The gate is the rule "one generating event per session at a time": ``ChatService.turn`` and the
battle service take it before anything else and give it back when the reply ends, so two events
racing in one session (two browser clicks, or crafted API calls) cannot interleave; the second is
refused with ``BUSY_NOTICE``. It is a plain ``threading.Lock`` because gradio may resume a streaming
generator on another worker thread than the one that started it.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..engines.dispatch import CancelToken  # noqa: F401 - the one token Stop trips (engines/dispatch.py)
from ..engines.protocol import ReplyStats

BUSY_NOTICE = "Please wait for the current reply (or press Stop) before sending another message."


def new_id() -> str:
    return uuid.uuid4().hex


class Gate:
    """At most one generating event at a time. ``begin()`` never blocks: False means refuse."""

    def __init__(self):
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        return Gate()

    def begin(self) -> bool:
        return self._lock.acquire(blocking=False)

    def end(self) -> None:
        if self._lock.locked():
            self._lock.release()

    @property
    def busy(self) -> bool:
        return self._lock.locked()


@dataclass
class Exchange:
    """One user message and the reply to it, as the visitor sees them."""

    user: str
    reply: str = ""
    model: str = ""
    status: str = "streaming"         # a TurnUpdate status: streaming | done | cancelled | moderated | error ...
    notice: str = ""                  # moderation, error or context notice for this exchange
    stats: ReplyStats | None = None
    done: bool = False

    @property
    def in_context(self) -> bool:
        """Does the model see this exchange in later turns? Only a reply that was really given (a flagged
        message, a withdrawn or failed reply never is)."""
        return self.status in ("done", "cancelled") and bool(self.reply)

    @property
    def footer(self) -> str:
        """The statistics line under a finished reply ('' while streaming or when nothing was generated)."""
        if not self.done or self.stats is None or not self.stats.n_tokens:
            return ""
        return self.stats.summary()

    @property
    def cut_at_limit(self) -> bool:
        """A reply the token limit cut: Continue may go on with it."""
        return (self.done and self.status == "done" and bool(self.reply) and self.stats is not None
                and self.stats.finish_reason == "length")

    @property
    def unanswered(self) -> bool:
        """Stopped before its first token: the visitor's message stays (as in ChatGPT-like UIs, ready for
        Regenerate or an edit), with no reply at all, neither on the page nor in the model's context."""
        return self.done and self.status == "cancelled" and not self.reply

    def apply(self, update) -> None:
        """Take a ``TurnUpdate`` of the reply to this exchange."""
        self.reply, self.status, self.notice, self.done = update.reply, update.status, update.notice, update.done
        self.stats = update.stats or self.stats
        self.model = update.model or self.model


@dataclass
class ChatSession:
    """One visitor's single-chat conversation (lives in the visitor's ``gr.State``)."""

    conversation_id: str = field(default_factory=new_id)
    exchanges: list[Exchange] = field(default_factory=list)
    cancel: CancelToken = field(default_factory=CancelToken)
    gate: Gate = field(default_factory=Gate)
    turn_counter: int = 0
    # what the visitor's browser keeps to find this conversation again after a reload (ConversationKeeper)
    resume_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def __deepcopy__(self, memo):
        return ChatSession()

    @property
    def busy(self) -> bool:
        return self.gate.busy


def messages_for(history: Sequence[Exchange], system: str | None, user: str) -> tuple[dict, ...]:
    """The messages for the model, built once: the system prompt, the earlier exchanges the model saw,
    then ``user``. A new tuple of new dicts, so nothing that happens to the session later can change
    what was moderated and sent."""
    messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
    for exchange in history:
        if exchange.in_context:
            messages += [{"role": "user", "content": exchange.user},
                         {"role": "assistant", "content": exchange.reply}]
    messages.append({"role": "user", "content": user})
    return tuple(messages)


class ConversationKeeper:
    """Conversations kept on the server so that a page reload finds them again.

    The browser keeps only ``ChatSession.resume_key`` (256 random bits); the text stays here. So nothing
    a visitor sends back can put words in a conversation: no forged reply, no flagged message made
    unflagged, no special token that skipped moderation. A key this keeper does not know (made up,
    expired, or from before a restart) gives a new conversation. At most ``max_kept`` conversations
    are kept, each for ``ttl_s`` after its last turn (the oldest go first); thread-safe."""

    def __init__(self, max_kept: int = 2000, ttl_s: float = 24 * 3600.0, clock: Callable[[], float] = time.monotonic):
        self.max_kept, self.ttl_s, self._clock = max_kept, ttl_s, clock
        self._kept: OrderedDict[str, tuple[float, ChatSession]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, session: ChatSession) -> None:
        with self._lock:
            self._kept[session.resume_key] = (self._clock(), session)
            self._kept.move_to_end(session.resume_key)
            while len(self._kept) > self.max_kept:
                self._kept.popitem(last=False)

    def find(self, key) -> ChatSession | None:
        if not isinstance(key, str):
            return None
        with self._lock:
            kept = self._kept.get(key)
            if kept is None:
                return None
            if self._clock() - kept[0] > self.ttl_s:
                del self._kept[key]
                return None
            return kept[1]

    def forget(self, session: ChatSession) -> None:
        with self._lock:
            self._kept.pop(session.resume_key, None)
