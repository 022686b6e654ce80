"""Serving the demo to other people: password protection, who the visitor is, request body caps and the one
upload the app takes, the share link and start-up warnings.

    auth = parse_auth(["alice:secret", "@users.txt"])        # -> [("alice", "secret"), ...]
    trusted = trusted_proxies(settings, space=on_space())  # --forwarded-allow-ips, the Space default
    launch(app_kwargs={"middleware": [Middleware(BodyLimitMiddleware, check_upload=...),
                                      Middleware(ClientAddressMiddleware, trusted=trusted)]})
    for text in startup_warnings(settings, moderation_on=..., space=on_space()): print(loud(text))
    if settings.share and share_url is None: print(share_failed_message(local_url))
    moved = port_moved_message(asked_port(settings), used_port)    # '' when the asked port was free
"""

from __future__ import annotations

import json
import logging
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


# -- what a visitor without a password can reach ---------------------------------------------------

UPLOADS_REFUSED = "This demo takes no file uploads."
MAX_BODY_BYTES = 8 * 1024 * 1024      # a chat of 50 long turns is well under 2 MiB of JSON
BODY_TOO_LARGE = "The request body is larger than this demo accepts ({limit})."


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB" if n >= 1024 * 1024 else f"{n / 1024:g} KiB"


class BodyLimitMiddleware:
    """ASGI middleware: caps every request body, and lets one kind of upload through.

    - Every route: a body declared larger than ``max_bytes`` (Content-Length) gets 413 before any byte is
      read; a body without a length (chunked) is read up to the cap and refused as soon as it passes it.
      This holds before login too (gradio checks the login inside its routes, after reading).
    - ``POST /gradio_api/upload``: refused with 413 ``This demo takes no file uploads.`` unless the app
      takes question files (``check_upload`` is given: a judge is set up, so the 📋 Evaluate tab offers
      its upload). Then the body, capped at ``upload_bytes``, must be one file that
      ``check_upload(filename, data)`` accepts (evaluation/questions.py: name, size, UTF-8, every line's
      schema); otherwise 422 with one line per problem. Only then does gradio see (and store) it.

    The body is read once here and handed on unchanged."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, check_upload=None, upload_bytes: int = 0):
        self.app = app
        self.max_bytes = max_bytes
        self.check_upload = check_upload
        self.upload_bytes = upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/gradio_api/upload")
        if upload and self.check_upload is None:
            return await _plain_response(send, 413, UPLOADS_REFUSED)
        # a multipart body is a little larger than the file it carries
        limit = self.upload_bytes + 64 * 1024 if upload else self.max_bytes
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await _plain_response(send, 400, "The Content-Length header is not a number.")
            if length > limit:
                return await _plain_response(send, 413, BODY_TOO_LARGE.format(limit=_size(limit)))
            if length == 0 and not upload:
                return await self.app(scope, receive, send)
        elif b"transfer-encoding" not in headers and not upload:
            return await self.app(scope, receive, send)  # no body at all (GET, HEAD ...)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _plain_response(send, 413, BODY_TOO_LARGE.format(limit=_size(limit)))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if upload:
            problem = await self._upload_problem(scope, body)
            if problem:
                return await _plain_response(send, 422, problem)
        await self.app(scope, _replaying(body, receive), send)

    async def _upload_problem(self, scope, body: bytes) -> str:
        """'' when the upload is one acceptable question file, else why not (one line per problem)."""
        from starlette.requests import Request

        async def once():
            return {"type": "http.request", "body": body, "more_body": False}
        try:
            form = await Request(scope, once).form(max_files=2, max_fields=10)
        except Exception as exc:  # noqa: BLE001 - malformed multipart: say so, never a traceback
            return f"The upload is not a well-formed multipart form ({type(exc).__name__})."
        try:
            files = [v for _, v in form.multi_items() if hasattr(v, "filename") and hasattr(v, "read")]
            if len(files) != 1:
                return "Upload exactly one question file."
            data = await files[0].read()
            try:
                self.check_upload(files[0].filename or "", data)
            except ValueError as exc:
                return str(exc)
            return ""
        finally:
            await form.close()


class HideApiInfoBeforeLoginMiddleware:
    """ASGI middleware: the login page no longer embeds the API description.

    With --auth, gradio's page for a visitor who has not logged in carries an empty config and
    ``"auth_required": true``, but still inlines ``window.gradio_api_info`` (every endpoint, parameter
    and model name) although ``/gradio_api/info`` refuses the same visitor. That script is replaced by
    ``window.gradio_api_info = null;`` on such pages; after login the page is served whole."""

    MARK = b'"auth_required":true'
    START, END = b"<script>window.gradio_api_info = ", b";</script>"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or "/gradio_api/" in scope["path"]:
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def send_filtered(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", ()))
                if not headers.get(b"content-type", b"").startswith(b"text/html") or b"content-encoding" in headers:
                    start = None
                    return await send(message)
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = self.strip(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", ()) if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_filtered)

    def strip(self, page: bytes) -> bytes:
        if self.MARK not in page:
            return page
        begin = page.find(self.START)
        end = page.find(self.END, begin + len(self.START))
        if begin < 0 or end < 0:
            return page
        return page[:begin] + self.START + b"null" + page[end:]


def _replaying(body: bytes, receive):
    """An ASGI ``receive`` for the app behind a middleware that read the whole body: the body once, then
    the real channel (so a disconnect still reaches the app)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class CheckQueueJoinMiddleware:
    """ASGI middleware: a crafted ``POST /gradio_api/queue/join`` naming no event (unknown ``fn_index``) or
    sending fewer input values than the event takes gets a 422 with one sentence, instead of a 500 and
    a traceback in the console (gradio raises KeyError / ValueError on them)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or \
                not scope["path"].rstrip("/").endswith("/gradio_api/queue/join"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = self.problem(scope, body)
        if problem:
            return await _plain_response(send, 422, problem)
        await self.app(scope, _replaying(body, receive), send)

    @staticmethod
    def problem(scope, body: bytes) -> str:
        try:
            join = json.loads(body)
        except ValueError:
            return ""  # FastAPI answers 422 itself
        app = scope.get("app")
        if not isinstance(join, dict) or not isinstance(join.get("data"), list) or app is None or \
                _needs_login(app, scope):
            return ""  # gradio answers 401 to a visitor who has not logged in: say nothing about events
        fn_index = join.get("fn_index")
        fn = app.get_blocks().fns.get(fn_index) if isinstance(fn_index, int) else None
        if fn is None:
            return f"No event has fn_index {fn_index!r}."
        if len(join["data"]) < len(fn.inputs):
            return f"This event takes {len(fn.inputs)} input values; the request sent {len(join['data'])}."
        return ""


def _needs_login(app, scope) -> bool:
    """Does gradio want a login for this request (auth on and no valid session cookie)? Reads gradio's
    cookie (``access-token-<cookie_id>``); when those internals are missing, assume a login is needed."""
    if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
        return False
    from starlette.requests import HTTPConnection
    cookies = HTTPConnection(scope).cookies
    cookie_id, tokens = getattr(app, "cookie_id", None), getattr(app, "tokens", None) or {}
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return cookie_id is None or tokens.get(token) is None


async def _plain_response(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class OneLineRequestErrors(logging.Filter):
    """uvicorn's "Exception in ASGI application" (a crafted request gradio fails on: an unknown
    fn_index, a queue stream for an unknown session) becomes one line naming the error; the full
    traceback is logged at DEBUG (``--log-level DEBUG``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Exception in ASGI application"):
            error = record.exc_info[1]
            while error is not None and error.__cause__ is not None and isinstance(error, RuntimeError):
                error = error.__cause__  # starlette's "response already started" wraps the real one
            logging.getLogger("vicuna_demo.requests").debug("a request failed", exc_info=record.exc_info)
            record.msg = "A malformed request failed in gradio: %s: %s"
            record.args = (type(error).__name__, str(error)[:200].replace("\n", " "))
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_malformed_requests() -> None:
    """Install OneLineRequestErrors on uvicorn's error logger (once per process)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, OneLineRequestErrors) for f in logger.filters):
        logger.addFilter(OneLineRequestErrors())


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


DEFAULT_PORT = 7860


def asked_port(settings: Settings) -> int:
    """The port the user asked for: --port, else gradio's GRADIO_SERVER_PORT, else 7860. Without --port gradio
    takes the next free one when that is in use (up to 100 further); with it, that port or nothing."""
    if settings.port is not None:
        return settings.port
    try:
        return int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    except ValueError:
        return DEFAULT_PORT


def port_moved_message(asked: int, used: int | None) -> str:
    """One line when the app serves on another port than the one asked for ('' otherwise)."""
    if used is None or used == asked:
        return ""
    return (f"Port {asked} is in use (another app, or another copy of this one), so this demo serves on port "
            f"{used} instead; --port chooses one.")


def port_taken_message(port: int) -> str:
    """The one line when --port names a port that is in use (gradio tries no other then)."""
    return (f"--port {port}: the port is in use (another app, or another copy of this one). Choose another port, "
            "or leave --port out to take the next free one from 7860.")
