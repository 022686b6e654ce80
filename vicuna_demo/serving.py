"""Serving the demo to other people: password protection, who the visitor is, the share link and start-up warnings.

    auth = parse_auth(["alice:secret", "@users.txt"])        # -> [("alice", "secret"), ...]
    trusted = trusted_proxies(settings, space=on_space())  # --forwarded-allow-ips, the Space default
    launch(app_kwargs={"middleware": [Middleware(ClientAddressMiddleware, trusted=trusted)]})
    for text in startup_warnings(settings, moderation_on=..., space=on_space()): print(loud(text))
    if settings.share and share_url is None: print(share_failed_message(local_url))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .config import ConfigError, Settings
from .services.identity import SPACE_PROXIES, TrustedProxies, forwarded_chain, resolve_client

AUTH_MESSAGE = "This demo is password protected: log in with the user name and password you were given."


# -- auth ----------------------------------------------------------------------------------------

def parse_auth(entries: Sequence[str]) -> list[tuple[str, str]]:
    """``USER:PASSWORD`` entries and ``@FILE`` references (one pair per line, ``#`` comments) -> pairs.

    Errors name the entry or the file line, never the password."""
    pairs: list[tuple[str, str]] = []
    for number, entry in enumerate(entries, 1):
        entry = entry.strip()
        if entry.startswith("@"):
            path = Path(entry[1:]).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--auth @{path}: cannot read the file ({type(exc).__name__}: "
                                  f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'}).") from None
            for line_no, line in enumerate(lines, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    pairs.append(_auth_pair(line.strip(), f"--auth @{path}, line {line_no}"))
        else:
            pairs.append(_auth_pair(entry, f"--auth entry {number}"))
    users = [user for user, _ in pairs]
    for user in users:
        if users.count(user) > 1:
            raise ConfigError(f"--auth: the user {user!r} is listed twice; give each user one password.")
    if entries and not pairs:
        raise ConfigError("--auth: no USER:PASSWORD pair found (the file is empty or all comments).")
    return pairs


def _auth_pair(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise ConfigError(f"{where}: expected USER:PASSWORD with a non-empty user and password "
                          "(a password may itself contain ':').")
    return user.strip(), password


# -- who is the visitor ---------------------------------------------------------------------------

def trusted_proxies(settings: Settings, space: bool = False) -> TrustedProxies:
    """--forwarded-allow-ips, or by default none (the TCP peer is the visitor), or the Space's proxies on a Space."""
    spec = settings.forwarded_allow_ips
    if spec is None:
        spec = SPACE_PROXIES if space else ""
    try:
        return TrustedProxies.parse(spec)
    except ValueError as exc:
        raise ConfigError(f"--forwarded-allow-ips: {exc}.") from None


def stop_server_trusting_proxy_headers() -> None:
    """Keep uvicorn (which gradio runs) from rewriting the peer from X-Forwarded-For itself.

    uvicorn trusts the header from FORWARDED_ALLOW_IPS, by default 127.0.0.1 and ::1, and would hand the
    app a visitor-chosen address for every request arriving through a local tunnel or proxy.
    ClientAddressMiddleware applies --forwarded-allow-ips instead, so uvicorn is told to trust no one."""
    os.environ["FORWARDED_ALLOW_IPS"] = ""


class ClientAddressMiddleware:
    """ASGI middleware: the request's client becomes the visitor by the rules of services/identity.py.

    Like uvicorn's ProxyHeadersMiddleware, but strict: right-most untrusted entry, garbage never
    becomes an identity, several headers read as one list. Everything after it (gradio's gr.Request,
    ui.common.client_address) sees the visitor's address as ``request.client.host``."""

    def __init__(self, app, trusted: TrustedProxies):
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and self.trusted and scope.get("client"):
            peer, port = scope["client"]
            values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-forwarded-for"]
            visitor = resolve_client(peer, forwarded_chain(values), self.trusted)
            if visitor is not None and visitor != peer:
                scope = {**scope, "client": (visitor, 0)}
        await self.app(scope, receive, send)


# -- start-up and share link -----------------------------------------------------------------------

def on_space() -> bool:
    """Running on Hugging Face Spaces (which sets SPACE_ID)?"""
    return bool(os.environ.get("SPACE_ID"))


def startup_warnings(settings: Settings, *, moderation_on: bool, space: bool = False) -> list[str]:
    """What a host must hear before strangers can reach the demo: public without moderation or without auth."""
    warnings: list[str] = []
    public = "a public share link (--share)" if settings.share else ("a Hugging Face Space" if space else "")
    if public and not moderation_on:
        warnings.append(
            f"This demo is reachable through {public} and content moderation is OFF: anyone can send anything to "
            "the models. Set OPENAI_API_KEY (or pass --moderation openai) to check every message.")
    if settings.share and not settings.auth:
        warnings.append(
            "The share link is public and the demo has no password: anyone with the link can use it. "
            "Add --auth USER:PASSWORD (or VICUNA_DEMO_AUTH) to restrict it.")
    return warnings


def loud(text: str) -> str:
    """A warning framed so it stands out in a console full of start-up logs."""
    bar = "!" * 78
    return f"\n{bar}\n!! WARNING: {text}\n{bar}\n"


def share_failed_message(local_url: str, space: bool = False) -> str:
    """The one line printed when --share did not produce a link."""
    if space:
        return ("Share link: not created, because Hugging Face Spaces do not allow share links; the Space's own "
                "URL is already public, so --share can be dropped.")
    return (f"Share link: not created, because this machine could not reach gradio's tunnel service (no internet "
            f"access, or outbound HTTPS to api.gradio.app / port 7000 blocked); the demo is still serving locally "
            f"at {local_url}. To share it, allow that traffic and restart with --share, or deploy it as a "
            f"Hugging Face Space (docs/deploy.md), or expose it yourself with --host 0.0.0.0 behind a proxy.")
