"""A local OpenAI-compatible judge for the evaluation tests: ``/v1/chat/completions`` (streamed, as
the app's RemoteEngine asks) and ``/v1/models``, answering with whatever ``decide(messages)``
returns, so each test chooses the verdicts. ``requests`` records every chat request's messages.

    with JudgeServer(lambda messages: "Both fine. [[A]]") as judge:
        endpoint = f"name=Judge,base_url={judge.base_url},model=judge"

Misbehaving as real services do: ``max_concurrent=N`` answers 429 (with ``Retry-After: retry_after``) to a
request arriving while N are in flight; ``fail_every=K`` answers 500 to every K-th request; ``fail_when``
(messages -> bool) answers 500 to those requests every time; ``delay_s`` slows each streamed word.
``peak`` is the most requests seen in flight at once, ``refused`` counts the 429s and 500s sent.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def judged_answers(messages: list[dict]) -> tuple[str, str]:
    """The two answers a pairwise judge prompt shows, in order (first shown, second shown)."""
    text = messages[-1]["content"]

    def block(title: str) -> str:
        start = text.index(f"<<<{title}>>>") + len(title) + 6
        return text[start:text.index(f"<<<end of {title}>>>")].strip()
    try:
        return block("answer of assistant A"), block("answer of assistant B")
    except ValueError:
        return block("conversation with assistant A"), block("conversation with assistant B")


class JudgeServer:
    def __init__(self, decide: Callable[[list[dict]], str], *, delay_s: float = 0.0, status: int = 200,
                 max_concurrent: int | None = None, retry_after: float = 1, fail_every: int | None = None,
                 fail_when: Callable[[list[dict]], bool] | None = None):
        self.decide, self.delay_s, self.status = decide, delay_s, status
        self.max_concurrent, self.retry_after, self.fail_every, self.fail_when = (max_concurrent, retry_after,
                                                                                  fail_every, fail_when)
        self.active = self.peak = self.received = 0
        self.refused = {429: 0, 500: 0}
        self.requests: list[list[dict]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def endpoint(self, name: str = "Judge", **extra) -> str:
        return ",".join([f"name={name}", f"base_url={self.base_url}", "model=judge-model",
                         *(f"{k}={v}" for k, v in extra.items())])

    def __enter__(self) -> "JudgeServer":
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send_json(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send_json(200, {"object": "list", "data": [{"id": "judge-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                messages = body.get("messages", [])
                with server._lock:
                    server.received += 1
                    busy = server.max_concurrent is not None and server.active >= server.max_concurrent
                    fail = (server.fail_every and server.received % server.fail_every == 0) or \
                        (server.fail_when is not None and server.fail_when(messages))
                    if busy:
                        server.refused[429] += 1
                    elif fail:
                        server.refused[500] += 1
                    else:
                        server.active += 1
                        server.peak = max(server.peak, server.active)
                        server.requests.append(messages)
                if busy:
                    self.send_response(429)
                    self.send_header("Retry-After", f"{server.retry_after:g}")
                    self.send_header("Content-Type", "application/json")
                    data = b'{"error": {"message": "Too many requests in flight."}}'
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                if fail:
                    return self._send_json(500, {"error": {"message": "Internal server error."}})
                try:
                    self._answer(messages)
                finally:
                    with server._lock:
                        server.active -= 1

            def _answer(self, messages):
                if server.status != 200:
                    return self._send_json(server.status, {"error": {"message": "the judge is down"}})
                text = server.decide(messages)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                words = text.split(" ")
                pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
                try:
                    for piece in pieces:
                        time.sleep(server.delay_s)
                        self._event({"delta": {"content": piece}, "finish_reason": None})
                    self._event({"delta": {}, "finish_reason": "stop"})
                    self._chunk(b"data: [DONE]\n\n")
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _event(self, choice: dict) -> None:
                payload = {"id": "j", "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": "judge-model", "choices": [{"index": 0, **choice}]}
                self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler
