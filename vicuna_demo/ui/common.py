"""Pieces the tabs share: rendering a conversation for gr.Chatbot, client ids (the sampling sliders: sampling.py)."""

from __future__ import annotations

import gradio as gr

from ..services.identity import visitor_id
from ..services.session import Exchange

CURSOR = "▌"


def render_exchanges(exchanges: list[Exchange], pending: str | None = None) -> list[dict]:
    """gr.Chatbot messages: each reply (with a cursor while it streams), its notice and its statistics line.
    ``pending``: a message just sent, shown before the service has taken it."""
    rendered: list[dict] = []
    for exchange in exchanges:
        rendered.append({"role": "user", "content": exchange.user})
        if exchange.unanswered:
            continue
        body = exchange.reply if exchange.done else exchange.reply + CURSOR
        if exchange.notice:
            body = f"{body}\n\n> {exchange.notice}" if body else f"> {exchange.notice}"
        if exchange.footer:
            body += f"\n\n<sub>⏱ {exchange.footer}</sub>"
        if body:
            rendered.append({"role": "assistant", "content": body})
    if pending:
        rendered += [{"role": "user", "content": pending}, {"role": "assistant", "content": CURSOR}]
    return rendered


def exchange_of(exchanges: list[Exchange], message_index) -> int | None:
    """The exchange whose user message is message ``message_index`` of ``render_exchanges(exchanges)`` (what
    gr.EditData.index names), or None when that message is not a visitor's."""
    rendered = render_exchanges(exchanges)
    if isinstance(message_index, bool) or not isinstance(message_index, int) \
            or not 0 <= message_index < len(rendered) or rendered[message_index]["role"] != "user":
        return None
    return sum(1 for message in rendered[:message_index] if message["role"] == "user")


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
