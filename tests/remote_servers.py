"""Real OpenAI-compatible servers for the remote-engine tests, all on 127.0.0.1.

- ``save_embedded_checkpoint(loaded, folder)``: the embedded SmolLM2 (loaded from GGUF, which refuses
  ``save_pretrained``) copied into a fresh ``LlamaForCausalLM`` and saved with its tokenizer, so
  ``transformers serve`` can load it offline.
- ``TransformersServe(folder).start()``: ``transformers serve FOLDER`` as a subprocess with
  ``HF_HUB_OFFLINE=1`` on a free port; ``.base_url``, ``.model`` (the id it answers to), ``.kill()``.
- ``Gateway(upstream_base_url, key=...).start()``: a stdlib HTTP front that checks the bearer key
  (401 otherwise, echoing the key it was given as a careless server would), forwards everything to
  the upstream server chunk by chunk, and can inject faults: ``fail_next(status)`` (429 with
  Retry-After, 5xx...), ``malform_next(after_events, data)``, ``cut_next(after_events)``,
  ``hang_next(seconds)``, ``add_to_next_body(extra)``, ``refuse_stream_options()``. ``.requests``
  records each request's body, how many stream events were forwarded, and whether the client closed
  the connection before the end (the gateway then closes its upstream connection, so the real
  server sees the disconnect too).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_embedded_checkpoint(loaded, folder: Path) -> Path:
    """Write the GGUF-loaded model as a plain safetensors checkpoint plus tokenizer (chat template included)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)  # it names the GGUF file, which the folder does not have
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


class TransformersServe:
    """``transformers serve`` pinned to one local checkpoint, offline, in a subprocess."""

    def __init__(self, folder: Path, log_path: Path):
        self.folder, self.log_path = str(folder), log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return self.folder  # a pinned server answers to the name it was started with

    def start(self, ready_timeout_s: float = 240.0) -> "TransformersServe":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        cli = Path(sys.executable).with_name("transformers")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(cli), "serve", self.folder, "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
             "--log-level", "info"], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve was not ready after {ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-stream if a reply is streaming."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()


@dataclass
class GatewayRequest:
    method: str
    path: str
    authorized: bool
    body: Any = None
    status: int = 0
    events: list[str] = field(default_factory=list)   # the SSE data lines forwarded to the client
    client_closed: bool = False                         # the client hung up before the stream ended
    completed: bool = False                             # the upstream stream ended and was forwarded whole


class Gateway:
    """See the module docstring. Thread-safe; faults apply to the next chat request."""

    def __init__(self, upstream: str, key: str | None = None):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.key = key
        self._lock = threading.Lock()
        self._faults: list[dict] = []
        self._refuse_stream_options = False
        self.requests: list[GatewayRequest] = []
        self._httpd: ThreadingHTTPServer | None = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> "Gateway":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- faults ------------------------------------------------------------------------------
    def fail_next(self, status: int, message: str = "Rate limit reached for requests.", retry_after: int | None = None):
        with self._lock:
            self._faults.append({"kind": "status", "status": status, "message": message, "retry_after": retry_after})

    def malform_next(self, after_events: int, data: str) -> None:
        """Forward ``after_events`` real events, then send ``data: <data>`` and end the stream."""
        with self._lock:
            self._faults.append({"kind": "malform", "after": after_events, "data": data})

    def cut_next(self, after_events: int) -> None:
        """Forward ``after_events`` real events, then end the stream cleanly, without a finish_reason."""
        with self._lock:
            self._faults.append({"kind": "malform", "after": after_events, "data": None})

    def add_to_next_body(self, extra: dict) -> None:
        """Merge ``extra`` into the next request's JSON before forwarding it (e.g. a logit_bias)."""
        with self._lock:
            self._faults.append({"kind": "add", "extra": extra})

    def hang_next(self, seconds: float) -> None:
        with self._lock:
            self._faults.append({"kind": "hang", "seconds": seconds})

    def refuse_stream_options(self) -> None:
        """From now on answer 400 to requests carrying stream_options, as some older servers do."""
        self._refuse_stream_options = True

    def chat_requests(self) -> list[GatewayRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def _next_fault(self) -> dict | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None


def _make_handler(gw: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._handle(None)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._handle(raw)

        def _handle(self, raw: bytes | None) -> None:
            presented = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            authorized = gw.key is None or presented == gw.key
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            record = GatewayRequest(self.command, self.path, authorized, body)
            with gw._lock:
                gw.requests.append(record)
            if not authorized:
                # As OpenAI does, name the key that was presented: the client must not pass it on.
                return self._json(record, 401, {"error": {
                    "message": f"Incorrect API key provided: {presented}. You can find your key in your account.",
                    "type": "invalid_request_error", "code": "invalid_api_key"}})
            if gw._refuse_stream_options and isinstance(body, dict) and "stream_options" in body:
                refusal = "Unrecognized request argument supplied: stream_options"
                return self._json(record, 400, {"error": {"message": refusal, "type": "invalid_request_error"}})
            fault = gw._next_fault() if self.command == "POST" else None
            if fault and fault["kind"] == "status":
                headers = {"Retry-After": str(fault["retry_after"])} if fault["retry_after"] else {}
                return self._json(record, fault["status"], {"error": {"message": fault["message"],
                                                                      "type": "requests"}}, headers)
            if fault and fault["kind"] == "hang":
                time.sleep(fault["seconds"])
            if fault and fault["kind"] == "add":
                raw = json.dumps({**body, **fault["extra"]}).encode()
            self._forward(record, raw, fault if fault and fault["kind"] == "malform" else None)

        def _forward(self, record: GatewayRequest, raw: bytes | None, malform: dict | None) -> None:
            upstream = http.client.HTTPConnection(gw.upstream_host, gw.upstream_port, timeout=300)
            try:
                upstream.request(self.command, self.path, body=raw,
                                 headers={"Content-Type": "application/json", "Accept": "*/*"})
                answer = upstream.getresponse()
                record.status = answer.status
                if "text/event-stream" not in (answer.getheader("Content-Type") or ""):
                    data = answer.read()
                    return self._send(answer.status, answer.getheader("Content-Type") or "application/json", data)
                self.send_response(answer.status)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                event = b""
                while True:
                    line = answer.readline()
                    if not line:
                        break
                    event += line
                    if line.strip():
                        continue
                    if malform is not None and len(record.events) >= malform["after"]:
                        if malform["data"] is not None:
                            self._chunk(f"data: {malform['data']}\n\n".encode())
                        self._chunk(b"")
                        return
                    record.events.append(event.decode("utf-8", "replace").strip())
                    self._chunk(event)
                    event = b""
                self._chunk(b"")
                record.completed = True
            except (BrokenPipeError, ConnectionResetError):
                record.client_closed = True   # closing `upstream` below hangs up on the real server too
                self.close_connection = True
            finally:
                upstream.close()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _json(self, record: GatewayRequest, status: int, payload: Any, headers: dict | None = None) -> None:
            record.status = status
            self._send(status, "application/json", json.dumps(payload).encode(), headers)

        def _send(self, status: int, content_type: str, data: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler
