"""The moderation contract shared by every moderator: the result type, the interface, user-facing
texts, and the no-op moderator used when moderation is switched off.

The chat layer only ever talks to `Moderator.check(text) -> ModerationResult`; it never needs to
know which service (if any) sits behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

STATUS_PASSED = "passed"
STATUS_FLAGGED = "flagged"
STATUS_UNAVAILABLE = "unavailable"
STATUS_OFF = "off"

UNAVAILABLE_NOTICE = "The moderation service is unavailable right now, please retry in a moment."
OFF_DESCRIPTION = "Moderation is OFF: messages are not checked."


@dataclass(frozen=True)
class ModerationResult:
    """What a moderator decided about one text. Never holds scores, keys or the text itself."""

    allowed: bool  # may the text reach a model?
    status: str  # "passed" | "flagged" | "unavailable" | "off"
    categories: tuple[str, ...] = ()  # flagged category names, e.g. ("harassment", "self-harm")
    notice: str = ""  # user-facing text; "" when passed or off

    @classmethod
    def passed(cls) -> ModerationResult:
        return cls(allowed=True, status=STATUS_PASSED)

    @classmethod
    def off(cls) -> ModerationResult:
        return cls(allowed=True, status=STATUS_OFF)

    @classmethod
    def flagged(cls, categories: Iterable[str]) -> ModerationResult:
        names = tuple(categories)
        return cls(allowed=False, status=STATUS_FLAGGED, categories=names, notice=flagged_notice(names))

    @classmethod
    def unavailable(cls, *, allowed: bool) -> ModerationResult:
        """The service failed; `allowed` is the failure policy's answer (block -> False)."""
        return cls(
            allowed=allowed,
            status=STATUS_UNAVAILABLE,
            notice="" if allowed else UNAVAILABLE_NOTICE,
        )


def flagged_notice(categories: tuple[str, ...]) -> str:
    """The message shown to a user whose text was flagged; names the categories, never scores."""
    named = f" ({', '.join(categories)})" if categories else ""
    return f"Your message was not sent: it was flagged by the content moderation check{named}. Please rephrase."


@runtime_checkable
class Moderator(Protocol):
    """Anything that can decide whether a text may reach a model. `check` must be thread-safe and
    must not raise for service problems (it reports them as status "unavailable")."""

    enabled: bool

    def check(self, text: str) -> ModerationResult: ...

    def describe(self) -> str: ...


class NoModerator:
    """Moderation switched off: every text is allowed, nothing is sent anywhere."""

    enabled = False

    def check(self, text: str) -> ModerationResult:
        return ModerationResult.off()

    def describe(self) -> str:
        return OFF_DESCRIPTION

    def __repr__(self) -> str:
        return "NoModerator()"
