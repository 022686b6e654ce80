"""A recording OpenAI-compatible model for the hostile-visitor tests: a stdlib HTTP server on 127.0.0.1
that answers ``GET /v1/models`` and streams ``POST /v1/chat/completions`` (SSE chunks, a usage chunk
when asked), and records the messages of every request it receives, so a test can assert what reached
a model through the app's real remote engine (``--endpoint name=...,base_url=...,model=...``).

    with RecordingModelServer(reply="Hello there.", delay_s=0.05) as server:
        argv = ["--endpoint", server.endpoint("RecA", "rec-a"), "--endpoint", server.endpoint("RecB", "rec-b")]
        ... server.texts() -> every message content received, server.requests -> [(model, messages)]
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingModelServer:
    def __init__(self, reply: str = "Hello from the recording model.", delay_s: float = 0.05):
        self.reply, self.delay_s = reply, delay_s
        self._lock = threading.Lock()
        self._requests: list[tuple[str, list[dict]]] = []
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> "RecordingModelServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def endpoint(self, name: str, model: str) -> str:
        """An --endpoint spec for this server under ``name`` (the app's display name)."""
        return f"name={name},base_url={self.base_url},model={model}"

    @property
    def requests(self) -> list[tuple[str, list[dict]]]:
        with self._lock:
            return list(self._requests)

    def texts(self) -> list[str]:
        """Every message content received, in any request."""
        return [str(m.get("content", "")) for _, messages in self.requests for m in messages]

    def _record(self, model: str, messages: list[dict]) -> None:
        with self._lock:
            self._requests.append((model, messages))


def _chunk(model: str, delta: dict, finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


def _handler(server: RecordingModelServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _json(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                self._json(200, {"object": "list", "data": [{"id": "rec-a", "object": "model"},
                                                            {"id": "rec-b", "object": "model"}]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._json(404, {"error": {"message": "not found"}})
                return
            model, messages = body.get("model", ""), body.get("messages", [])
            server._record(model, messages)
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            words = server.reply.split(" ")
            try:
                self.wfile.write(_chunk(model, {"role": "assistant", "content": ""}))
                for i, word in enumerate(words):
                    time.sleep(server.delay_s)
                    self.wfile.write(_chunk(model, {"content": word + (" " if i < len(words) - 1 else "")}))
                    self.wfile.flush()
                self.wfile.write(_chunk(model, {}, "stop"))
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model, "choices": [],
                             "usage": {"prompt_tokens": 10, "completion_tokens": len(words),
                                       "total_tokens": 10 + len(words)}}
                    self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the app cancelled the reply
                pass
            self.close_connection = True

    return Handler
