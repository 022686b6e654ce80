"""The `llama-2-chat` prompt format (Meta's Llama 2 chat models).

`[INST] <<SYS>>\n<system>\n<</SYS>>\n\n<user> [/INST] <assistant> </s><s>[INST] <user> [/INST]`
The system block is left out when the system prompt is empty; the leading `<s>` is left to the
tokenizer (it adds BOS), as FastChat's `llama-2` template renders it. A conversation that ends
on a finished assistant turn ends with ` </s><s>`.
"""

from collections.abc import Sequence

from .messages import RoleContent
from .template import Template


def format_llama_2_chat(system: str | None, turns: Sequence[RoleContent]) -> str:
    parts = [f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n" if system else "[INST] "]
    for index, (role, content) in enumerate(turns):
        if role == "user":
            parts.append(f"{content} " if index == 0 else f"[INST] {content} ")
        else:
            parts.append(f"[/INST] {content} </s><s>")
    if turns[-1][0] == "user":
        parts.append("[/INST]")
    return "".join(parts)


LLAMA_2_CHAT = Template(
    name="llama-2-chat",
    system_message="",
    stop_strings=("</s>", "[INST]"),
    reserved=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "</s>", "<s>"),
    format=format_llama_2_chat,
)
