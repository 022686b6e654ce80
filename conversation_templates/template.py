"""The `Template` type: turns validated chat messages into a prompt, as a string or as segments.

A template is data (name, default system message, stop strings, reserved strings) plus a
`format` function that lays out already-cleaned turns. Callers need two entry points:
- `render(messages)` -> the prompt string (what a person reads; goldens compare it);
- `segments(messages, control)` -> the same prompt cut into `(text, plain)` pieces, where
  `plain=True` marks a token text (one of the tokenizer's added tokens, matched by `control`)
  that a caller typed; an encoder must spell those as text (see `marking.py`).
With `continue_final=True` the messages end with a partial assistant reply and the prompt ends
right after it, so the model goes on with the same reply (transformers' `continue_final_message`:
the final message is found in the rendered prompt and everything after it cut off).
Both validate the messages, pick the system message and clean every caller-supplied content:
reserved strings are neutralised (see `neutralise.py`) and marker characters removed. Text owned
by the template itself (its default system message, built-in example turns) is trusted as is.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .marking import mark_plain, split_marked, strip_markers
from .messages import RoleContent, parse_messages
from .neutralise import check_reserved, neutralise_with, reserved_pattern

# format(system, turns) -> prompt. `system` is None when there is no system prompt at all
# (none given and the template has no default); turns alternate user/assistant from the user,
# and a last user turn means "leave the assistant slot open".
Formatter = Callable[[str | None, Sequence[RoleContent]], str]

# A piece of a prompt: its text, and whether it is caller-typed token text to encode as text.
Segment = tuple[str, bool]


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

    def render(self, messages: Sequence[Mapping[str, object]], continue_final: bool = False) -> str:
        """The prompt for `messages`; ends with the open assistant slot if the user spoke last, or
        inside the last (assistant) message with `continue_final`.

        With no system message the template's default is used; a system message whose
        content is "" asks for an explicitly empty system prompt. Raises ValueError on
        malformed messages.
        """
        return self._format(messages, lambda text: strip_markers(self.neutralise(text)), continue_final)

    def segments(
        self, messages: Sequence[Mapping[str, object]], control: re.Pattern[str] | None,
        continue_final: bool = False,
    ) -> tuple[Segment, ...]:
        """The prompt of `render(messages)` as `(text, plain)` segments: every match of `control`
        (the tokenizer's token texts, see `marking.control_pattern`) inside caller-supplied
        content is its own `plain=True` segment. Joining the texts gives `render(messages)`."""
        return split_marked(self._format(messages, lambda text: mark_plain(self.neutralise(text), control),
                                         continue_final))

    def _format(self, messages: Sequence[Mapping[str, object]], clean: Callable[[str], str],
                continue_final: bool = False) -> str:
        system, turns = parse_messages(messages)
        if system is None:
            system = self.system_message or None
        else:
            system = clean(system)
        cleaned = tuple((role, clean(content)) for role, content in turns)
        prompt = self.format(system, cleaned)
        if not continue_final:
            return prompt
        role, partial = cleaned[-1]
        core = partial.rstrip()
        at = prompt.rfind(core) if role == "assistant" and core.strip() else -1
        if at < 0:
            raise ValueError("continue_final needs messages that end with a non-empty assistant message "
                             "that the template keeps as it is")
        end = at + len(core)
        tail = partial[len(core):]                  # trailing whitespace, if the template kept it
        return prompt[:end + len(tail)] if prompt[end:end + len(tail)] == tail else prompt[:end]
