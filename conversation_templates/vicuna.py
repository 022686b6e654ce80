"""Vicuna prompt formats: `vicuna_v1.1` (Vicuna v1.1, v1.3, v1.5) and `vicuna_v0` (one shot).

vicuna_v1.1 lays a conversation out as
    `<system> USER: Hello ASSISTANT: Hi there!</s>USER: What is 2+2? ASSISTANT:`
(a space after the system text and after each user turn, `</s>` after each finished
assistant turn, `ASSISTANT:` with no trailing space for the open slot). An explicitly empty
system prompt still leaves the leading space, and a conversation that ends on a finished
assistant turn ends with `</s>`, both as FastChat renders them.

vicuna_v0 starts with its system text, then the built-in example exchange, then every turn as
`\n### Human: ...` / `\n### Assistant: ...`; the open slot is `\n### Assistant:` and a
conversation that ends on a finished assistant turn ends with `\n### `. Generation stops at
`###`; vicuna_v1.1 stops at `</s>` and at a role marker that starts a line (`VICUNA_V1_1_STOPS`).
"""

from collections.abc import Sequence

from .messages import RoleContent
from .one_shot_example import EXAMPLE_TURNS
from .template import Template

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def format_vicuna_v1_1(system: str | None, turns: Sequence[RoleContent]) -> str:
    parts = [(system or "") + " "]
    for role, content in turns:
        if role == "user":
            parts.append(f"USER: {content} ")
        else:
            parts.append(f"ASSISTANT: {content}</s>")
    if turns[-1][0] == "user":
        parts.append("ASSISTANT:")
    return "".join(parts)


def format_vicuna_v0(system: str | None, turns: Sequence[RoleContent]) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    parts = [system or ""]
    for role, content in (*EXAMPLE_TURNS, *turns):
        parts.append(f"\n### {names[role]}: {content}")
    parts.append("\n### Assistant:" if turns[-1][0] == "user" else "\n### ")
    return "".join(parts)


# Vicuna itself ends a reply with its EOS token `</s>`. A model that was not trained on this format (the
# embedded SmolLM2 with template=vicuna_v1.1) goes on writing the next turns itself, each on a new line and
# often with a lookalike marker ("\nUSERS: ...", "\nASSISTANT: ..."): the reply stops at a role marker that
# starts a line, while one inside a line ("fill in the USER: field") is text and stays.
VICUNA_V1_1_STOPS = ("</s>", "\nUSER:", "\nUSERS:", "\nASSISTANT:")

VICUNA_V1_1 = Template(
    name="vicuna_v1.1",
    system_message=VICUNA_SYSTEM,
    stop_strings=VICUNA_V1_1_STOPS,
    reserved=("USER:", "ASSISTANT:", "</s>", "<s>"),
    format=format_vicuna_v1_1,
)

VICUNA_V0 = Template(
    name="vicuna_v0",
    system_message=VICUNA_V0_SYSTEM,
    stop_strings=("###",),
    reserved=("###", "Human:", "Assistant:", "</s>", "<s>"),
    format=format_vicuna_v0,
)
