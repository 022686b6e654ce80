"""The `Template` type: turns validated chat messages into one prompt string.

A template is data (name, default system message, stop strings, reserved strings) plus a
`format` function that lays out already-neutralised turns. `render` is the only entry point
callers need: it validates the messages, picks the system message, neutralises every
caller-supplied content (see `neutralise.py`) and formats. Text owned by the template itself
(its default system message, built-in example turns) is trusted and left as is.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .messages import Turn, parse_messages
from .neutralise import check_reserved, neutralise_with, reserved_pattern

# format(system, turns) -> prompt. `system` is None when there is no system prompt at all
# (none given and the template has no default); turns alternate user/assistant from the user,
# and a last user turn means "leave the assistant slot open".
Formatter = Callable[[str | None, Sequence[Turn]], str]


@dataclass(frozen=True, eq=False)
class Template:
    """A named conversation template; build one through `get_template`."""

    name: str
    system_message: str
    stop_strings: tuple[str, ...]
    reserved: tuple[str, ...]
    format: Formatter = field(repr=False)
    _pattern: re.Pattern[str] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "reserved", check_reserved(self.reserved))
        object.__setattr__(self, "_pattern", reserved_pattern(self.reserved))

    def neutralise(self, text: str) -> str:
        """`text` with a U+200B after the first character of each reserved string in it."""
        return neutralise_with(self._pattern, text)

    def render(self, messages: Sequence[Mapping[str, object]]) -> str:
        """The prompt for `messages`; ends with the open assistant slot if the user spoke last.

        With no system message the template's default is used; a system message whose
        content is "" asks for an explicitly empty system prompt. Raises ValueError on
        malformed messages.
        """
        system, turns = parse_messages(messages)
        if system is None:
            system = self.system_message or None
        else:
            system = self.neutralise(system)
        safe_turns = tuple((role, self.neutralise(content)) for role, content in turns)
        return self.format(system, safe_turns)
