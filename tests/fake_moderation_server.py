"""A fake OpenAI moderation service for tests: a real HTTP server on 127.0.0.1 (stdlib
`http.server` in a thread, port 0) that answers `POST /v1/moderations` with the JSON shape of
OpenAI's response, so the real `openai` SDK can be pointed at it through `base_url`.

    from tests.fake_moderation_server import FakeModerationServer

    with FakeModerationServer() as server:             # or server.start() ... server.stop()
        server.flag("kill you", {"harassment": 0.93, "violence": 0.81})
        server.set_scores({"sexual": 0.15})              # scores for every input, no flag
        server.fail_next(2, status=500)                  # or 429, with retry_after=...
        server.drop_next(1)                              # close the connection, no answer
        server.hang_next()                               # never answer until release()/stop()
        client = openai.OpenAI(api_key="sk-test", base_url=server.base_url)
        ...
        server.request_count, server.requests[-1].body, server.requests[-1].authorization

Pytest fixtures for other test files (import them into the test module to use them):
`fake_moderation_server` (one started server) and `fake_moderation_server_factory`
(call it to get more started servers; all are stopped at teardown).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator, Mapping

import pytest

CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
IMAGE_CAPABLE = frozenset(
    {"self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "violence", "violence/graphic"}
)
BASELINE_SCORE = 1e-06
HANG_SAFETY_S = 60.0  # a hung handler gives up on its own after this, whatever the test does


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, as the client sent it."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: Any  # parsed JSON, or the raw text when it was not JSON
    authorization: str | None

    @property
    def inputs(self) -> list[str]:
        """The texts the request asked to moderate (`input` as a string or a list)."""
        raw = self.body.get("input") if isinstance(self.body, dict) else None
        return _texts_of(raw)


@dataclass(frozen=True)
class _FlagRule:
    substring: str
    scores: Mapping[str, float]


@dataclass(frozen=True)
class _Failure:
    kind: str  # "status" | "drop" | "hang"
    status: int = 500
    retry_after: float | None = None
    message: str = ""
    echo_authorization: bool = False


def _texts_of(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        texts = []
        for item in raw:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict) and item.get("type") == "text":
                texts.append(str(item.get("text", "")))
            else:
                texts.append("")  # e.g. an image input: scored as clean text
        return texts
    return []


class FakeModerationServer:
    """Scriptable stand-in for the OpenAI moderation endpoint; see the module docstring.

    All configuration methods are thread-safe and may be called while the server runs.
    """

    def __init__(self, *, expected_api_key: str | None = None, model: str = "omni-moderation-latest") -> None:
        """`expected_api_key`: when set, requests with another bearer token get a 401."""
        self.expected_api_key = expected_api_key
        self.model = model
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._rules: list[_FlagRule] = []
        self._scores: dict[str, float] = {}
        self._failures: list[_Failure] = []
        self._hang_all = False
        self._requests: list[RecordedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeModerationServer:
        if self._httpd is not None:
            return self
        self._release.clear()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-moderation", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; wakes any hung handler (which then closes without answering)."""
        httpd, self._httpd = self._httpd, None
        self._release.set()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeModerationServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeModerationServer is not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """The URL to hand to the SDK as base_url / OPENAI_BASE_URL (ends in "/v1")."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -------------------------------------------------------------------------
    def flag(self, substring: str, categories: Iterable[str] | Mapping[str, float], score: float = 0.9) -> None:
        """Flag inputs containing `substring` with these categories (name -> score, or names at `score`)."""
        scores = dict(categories) if isinstance(categories, Mapping) else {name: score for name in categories}
        _check_names(scores)
        with self._lock:
            self._rules.append(_FlagRule(substring, scores))

    def set_scores(self, scores: Mapping[str, float]) -> None:
        """Scores reported for every input (without flagging it); replaces earlier set_scores."""
        _check_names(scores)
        with self._lock:
            self._scores = dict(scores)

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        retry_after: float | None = None,
        message: str | None = None,
        echo_authorization: bool = False,
    ) -> None:
        """Answer the next `count` requests with an OpenAI-style error of `status` (e.g. 500, 429).

        `retry_after` adds a Retry-After header; `echo_authorization` appends the request's
        Authorization header to the error message, like a careless proxy would.
        """
        if message is None:
            message = "Rate limit reached, please slow down." if status == 429 else "The server had an error."
        failure = _Failure("status", status, retry_after, message, echo_authorization)
        with self._lock:
            self._failures.extend([failure] * count)

    def drop_next(self, count: int = 1) -> None:
        """Close the connection without answering for the next `count` requests (a connection error)."""
        with self._lock:
            self._failures.extend([_Failure("drop")] * count)

    def hang_next(self, count: int | None = None) -> None:
        """Never answer the next `count` requests (all requests when None) until release() or stop()."""
        with self._lock:
            self._release.clear()
            if count is None:
                self._hang_all = True
            else:
                self._failures.extend([_Failure("hang")] * count)

    def release(self) -> None:
        """End hanging: hung requests are answered normally (if their client still listens)."""
        with self._lock:
            self._hang_all = False
            self._failures = [f for f in self._failures if f.kind != "hang"]
        self._release.set()

    def reset(self) -> None:
        """Forget rules, scores, pending failures and recorded requests."""
        self.release()
        with self._lock:
            self._rules.clear()
            self._scores = {}
            self._failures.clear()
            self._requests.clear()

    # -- inspection ------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    # -- used by the handler -----------------------------------------------------------------
    def _record_and_plan(self, request: RecordedRequest) -> _Failure | None:
        with self._lock:
            self._requests.append(request)
            if self._failures:
                return self._failures.pop(0)
            return _Failure("hang") if self._hang_all else None

    def _moderate(self, model: str | None, texts: list[str]) -> dict[str, Any]:
        with self._lock:
            rules, base_scores = list(self._rules), dict(self._scores)
        results = []
        for text in texts:
            scores = {name: base_scores.get(name, BASELINE_SCORE) for name in CATEGORIES}
            flagged_names: set[str] = set()
            for rule in rules:
                if rule.substring in text:
                    flagged_names.update(rule.scores)
                    for name, value in rule.scores.items():
                        scores[name] = max(scores[name], value)
            results.append(
                {
                    "flagged": bool(flagged_names),
                    "categories": {name: name in flagged_names for name in CATEGORIES},
                    "category_scores": scores,
                    "category_applied_input_types": {
                        name: (["text"] if text else []) for name in CATEGORIES
                    },
                }
            )
        return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model or self.model, "results": results}


def _check_names(scores: Mapping[str, float]) -> None:
    unknown = set(scores) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown moderation categories: {sorted(unknown)}")


def _make_handler(server: FakeModerationServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            self._send_json(HTTPStatus.NOT_FOUND, _error("Not found", "invalid_request_error"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8", "replace")
            try:
                body: Any = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = raw
            authorization = self.headers.get("Authorization")
            request = RecordedRequest(
                method="POST",
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                authorization=authorization,
            )
            plan = server._record_and_plan(request)

            if plan is not None and plan.kind == "hang":
                server._release.wait(HANG_SAFETY_S)
                if server._httpd is None:  # stopped: leave without answering
                    self.close_connection = True
                    return
            elif plan is not None and plan.kind == "drop":
                self.close_connection = True
                return
            elif plan is not None:
                message = plan.message
                if plan.echo_authorization:
                    message = f"{message} (received Authorization: {authorization})"
                kind = "rate_limit_exceeded" if plan.status == 429 else "server_error"
                headers = {} if plan.retry_after is None else {"Retry-After": f"{plan.retry_after:g}"}
                self._send_json(plan.status, _error(message, kind), headers)
                return

            if self.path.rstrip("/") != "/v1/moderations":
                self._send_json(HTTPStatus.NOT_FOUND, _error(f"Unknown path {self.path}", "invalid_request_error"))
                return
            if server.expected_api_key is not None and authorization != f"Bearer {server.expected_api_key}":
                self._send_json(HTTPStatus.UNAUTHORIZED, _error("Incorrect API key provided.", "invalid_api_key"))
                return
            if not isinstance(body, dict) or "input" not in body:
                self._send_json(HTTPStatus.BAD_REQUEST, _error("'input' is a required property", "invalid_request_error"))
                return
            self._send_json(HTTPStatus.OK, server._moderate(body.get("model"), _texts_of(body["input"])))

        def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
            data = json.dumps(payload).encode("utf-8")
            try:
                self.send_response(int(status))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up already
                self.close_connection = True

    return Handler


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


@pytest.fixture
def fake_moderation_server() -> Iterator[FakeModerationServer]:
    """A started FakeModerationServer, stopped after the test."""
    with FakeModerationServer() as server:
        yield server


@pytest.fixture
def fake_moderation_server_factory() -> Iterator[Callable[..., FakeModerationServer]]:
    """Call with FakeModerationServer's keyword arguments to get started servers; all are stopped after the test."""
    started: list[FakeModerationServer] = []

    def make(**kwargs: Any) -> FakeModerationServer:
        server = FakeModerationServer(**kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
