"""A stand-in for the Hugging Face Hub that serves one model folder, for tests that start the app on a Hub id.

    with FakeHub("someone/tiny-llama", folder, hold={"model.safetensors"}) as hub:
        env["HF_ENDPOINT"] = hub.endpoint          # huggingface_hub downloads from it as from the Hub
        ...                                        # the held files' downloads wait ...
        hub.release()                              # ... until now

It answers what huggingface_hub asks while downloading files (``HEAD``/``GET /{repo}/resolve/{rev}/{file}``,
with the commit, ETag and size headers; 404 with ``EntryNotFound`` for a file the folder lacks) and a 404 for
a repository's folder listing; ``model_info`` lists the folder's files. The files named in ``hold`` are announced at once but their bytes are sent only after
``release()``: a first run's long weights download, made as long as a test needs. ``requests`` records what
was asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo: str, folder: str | Path, hold: set[str] | frozenset[str] = frozenset()):
        self.repo, self.folder, self.hold = repo, Path(folder), set(hold)
        self.requests: list[tuple[str, str]] = []
        self.held = threading.Event()        # a held file's download has started and waits
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                prefix, api = f"/{hub.repo}/resolve/", f"/api/models/{hub.repo}"
                if path == api or path.startswith(api + "/revision/"):     # model_info
                    info = {"id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "private": False,
                            "siblings": [{"rfilename": f.name} for f in sorted(hub.folder.iterdir())]}
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=body)
                if path.startswith(api + "/tree/"):                         # a folder the repository lacks
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body=body)
                if not path.startswith(prefix):
                    return self._send(404, b"", {}, body=body)
                name = path[len(prefix):].split("/", 1)[1] if "/" in path[len(prefix):] else ""
                file = hub.folder / name
                if not name or not file.is_file():
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT},
                                      body=body)
                data = file.read_bytes()
                headers = {"X-Repo-Commit": COMMIT, "ETag": '"' + hashlib.sha256(data).hexdigest() + '"',
                           "Content-Type": "application/octet-stream"}
                if body and name in hub.hold:
                    hub.held.set()
                    hub._released.wait()
                self._send(200, data, headers, body=body)

            def _send(self, code: int, data: bytes, headers: dict, body: bool = True):
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
