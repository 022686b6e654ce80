"""Pieces the tabs share: a turn as the UI keeps it, rendering turns for gr.Chatbot, sliders, client ids."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..engines.protocol import MAX_NEW_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE
from ..services.identity import visitor_id


@dataclass
class Turn:
    """One user message and the reply to it, as a visitor sees them."""

    user: str
    reply: str = ""
    model: str = ""
    footer: str = ""          # tokens · first token · tok/s
    notice: str = ""          # moderation, error or context notice for this turn
    in_context: bool = False  # does the model see this exchange in later turns?


def turns_to_messages(turns: list[Turn], system: str | None) -> list[dict]:
    """OpenAI-style messages for the model: earlier exchanges it saw, then the last user message."""
    messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
    for turn in turns[:-1]:
        if turn.in_context and turn.reply:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply}]
    if turns:
        messages.append({"role": "user", "content": turns[-1].user})
    return messages


def render_turns(turns: list[Turn], cursor: str = "") -> list[dict]:
    """gr.Chatbot messages: each reply followed by its notice and its statistics line."""
    rendered: list[dict] = []
    for i, turn in enumerate(turns):
        rendered.append({"role": "user", "content": turn.user})
        body = turn.reply
        if i == len(turns) - 1 and cursor:
            body += cursor
        if turn.notice:
            body = f"{body}\n\n> {turn.notice}" if body else f"> {turn.notice}"
        if turn.footer:
            body += f"\n\n<sub>⏱ {turn.footer}</sub>"
        if body:
            rendered.append({"role": "assistant", "content": body})
    return rendered


def sampling_controls(defaults, max_limit: int):
    """Temperature / top_p / max new tokens sliders with FastChat's ranges and the app's defaults."""
    temperature = gr.Slider(*TEMPERATURE_RANGE, value=defaults.temperature, step=0.1, label="Temperature",
                            info="0 = greedy (deterministic)")
    top_p = gr.Slider(*TOP_P_RANGE, value=defaults.top_p, step=0.1, label="Top P")
    max_tokens = gr.Slider(MAX_NEW_TOKENS_RANGE[0], max_limit, value=min(defaults.max_new_tokens, max_limit),
                           step=16, label="Max output tokens")
    return temperature, top_p, max_tokens


def client_address(request: gr.Request | None) -> str:
    """The visitor's identity for the rate limit and the log (services/identity.py): the request's client,
    which serving.ClientAddressMiddleware has already resolved from a trusted proxy's X-Forwarded-For
    (--forwarded-allow-ips); without that, the TCP peer. An IPv6 visitor is its /64."""
    if request is None:
        return "unknown"
    return visitor_id(getattr(getattr(request, "client", None), "host", None))


def client_hash(service, request: gr.Request | None) -> str:
    """A salted hash of the visitor's address (the raw IP is never stored)."""
    return service.store.client_hash(client_address(request))
