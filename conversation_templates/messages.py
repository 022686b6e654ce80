"""Checking OpenAI-style chat messages before a template renders them.

`parse_messages` accepts `[{"role": "system"|"user"|"assistant", "content": str}, ...]`, with
an optional leading system message, then turns that alternate user, assistant, user, ...
starting with the user. Extra keys (gradio's `metadata`, `options`) are ignored. Anything else
raises ValueError saying what is wrong and where.
"""

from collections.abc import Mapping, Sequence

ROLES = ("system", "user", "assistant")

RoleContent = tuple[str, str]  # one turn as (role, content), role "user" or "assistant"


def _check_message(index: int, message: object) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
    if "role" not in message or "content" not in message:
        raise ValueError(f"message {index} must have 'role' and 'content' keys, got {sorted(message)}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"message {index} has unknown role {role!r}; expected one of {ROLES}")
    if not isinstance(content, str):
        raise ValueError(
            f"message {index} ({role}) content must be a str, got {type(content).__name__}"
        )
    return role, content


def parse_messages(messages: Sequence[Mapping[str, object]]) -> tuple[str | None, tuple[RoleContent, ...]]:
    """Split messages into (system content or None if absent, alternating turns)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    checked = [_check_message(i, m) for i, m in enumerate(messages)]
    system = None
    if checked and checked[0][0] == "system":
        system = checked[0][1]
        checked = checked[1:]
    if not checked:
        raise ValueError("messages must contain at least one user message")
    offset = len(messages) - len(checked)
    for i, (role, _) in enumerate(checked):
        expected = "user" if i % 2 == 0 else "assistant"
        article = "a" if expected == "user" else "an"
        if role == "system":
            raise ValueError(f"message {i + offset}: a system message is only allowed first")
        if role != expected:
            raise ValueError(
                f"message {i + offset}: expected {article} {expected} message, got {role}; "
                "turns must alternate user, assistant, user, ... starting with the user"
            )
    return system, tuple(checked)
