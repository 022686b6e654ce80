"""Content moderation for the chat demo: a small `Moderator` interface, an OpenAI-backed
implementation with an explicit failure policy, and a no-op one.

    from moderation import create_moderator
    moderator = create_moderator("auto", on_error="block")
    result = moderator.check(user_text)      # thread-safe, never raises for service problems
    if not result.allowed: show(result.notice)

Output moderation uses the same `check` on the model's reply. This package is a leaf: it imports
nothing from the rest of the app.
"""

from .base import (
    OFF_DESCRIPTION,
    UNAVAILABLE_NOTICE,
    ModerationResult,
    Moderator,
    NoModerator,
    flagged_notice,
)
from .factory import MODES, create_moderator
from .openai_moderator import DEFAULT_MODEL, OpenAIModerator
from .redaction import scrub
from .thresholds import CATEGORIES, parse_thresholds

__all__ = [
    "CATEGORIES",
    "DEFAULT_MODEL",
    "MODES",
    "OFF_DESCRIPTION",
    "UNAVAILABLE_NOTICE",
    "ModerationResult",
    "Moderator",
    "NoModerator",
    "OpenAIModerator",
    "create_moderator",
    "flagged_notice",
    "parse_thresholds",
    "scrub",
]
