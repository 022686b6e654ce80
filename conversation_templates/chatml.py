"""The plain `chatml` prompt format.

Every message is `<|im_start|>{role}\n{content}<|im_end|>\n`; the open assistant slot is
`<|im_start|>assistant\n`. There is no default system prompt: without one no system block is
written, while an explicitly empty one is written as an empty system block.
"""

from collections.abc import Sequence

from .messages import RoleContent
from .template import Template


def format_chatml(system: str | None, turns: Sequence[RoleContent]) -> str:
    messages = turns if system is None else (("system", system), *turns)
    parts = [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages]
    if turns[-1][0] == "user":
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


CHATML = Template(
    name="chatml",
    system_message="",
    stop_strings=("<|im_end|>",),
    reserved=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    format=format_chatml,
)
