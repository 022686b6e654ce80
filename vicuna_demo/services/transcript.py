"""A visitor's conversation as a file to download: JSON (OpenAI-style messages, each reply with its model,
finish reason and statistics line) and Markdown (for reading). Built from what the service holds, so the
file is the conversation on the screen, never a copy the browser sent back.

    as_json(session.exchanges, conversation_id=session.conversation_id)   # -> str
    as_markdown(session.exchanges)                                        # -> str
"""

from __future__ import annotations

import json
from typing import Sequence

from .session import Exchange


def messages_of(exchanges: Sequence[Exchange]) -> list[dict]:
    """Each exchange's user message, then its reply (if any was given or a notice replaced it)."""
    messages: list[dict] = []
    for exchange in exchanges:
        messages.append({"role": "user", "content": exchange.user})
        if exchange.unanswered or not (exchange.reply or exchange.notice):
            continue
        reply = {"role": "assistant", "content": exchange.reply, "model": exchange.model,
                 "finish_reason": (exchange.stats.finish_reason if exchange.stats else None) or exchange.status}
        if exchange.notice:
            reply["notice"] = exchange.notice
        if exchange.footer:
            reply["stats"] = exchange.footer
        messages.append(reply)
    return messages


def as_json(exchanges: Sequence[Exchange], conversation_id: str = "") -> str:
    return json.dumps({"conversation_id": conversation_id, "messages": messages_of(exchanges)},
                      ensure_ascii=False, indent=2) + "\n"


def as_markdown(exchanges: Sequence[Exchange]) -> str:
    parts = ["# Conversation"]
    for message in messages_of(exchanges):
        if message["role"] == "user":
            parts.append(f"## You\n\n{message['content']}")
            continue
        body = [message["content"]] if message["content"] else []
        if message.get("notice"):
            body.append(f"> {message['notice']}")
        if message.get("stats"):
            body.append(f"*{message['stats']}*")
        parts.append(f"## {message['model'] or 'Assistant'}\n\n" + "\n\n".join(body))
    return "\n\n".join(parts) + "\n"
