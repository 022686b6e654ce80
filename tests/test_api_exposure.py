"""What a visitor without a password, or with crafted requests, can reach: the app served as `python app.py`
serves it (app.serve: launch_kwargs and its middleware), driven over plain HTTP and gradio_client.

- uploads are refused (no component takes files), before the body is read;
- the login page does not embed the API description that /gradio_api/info refuses before login;
- crafted queue requests get a 422 with one sentence, and the console gets no traceback.
"""

from __future__ import annotations

import contextlib
import logging
import time

import httpx
import pytest
from gradio_client import Client

from tests.chat_client import chat
from tests.engines import RecordingEngine

USER, PASSWORD = "alice", "s3cret:pw"
MODEL = "Secret-Model-Name"


@contextlib.contextmanager
def served(argv, tmp_path):
    from app import create_app, serve
    from vicuna_demo.config import load_settings
    settings = load_settings([*argv, "--moderation", "off", "--rate-limit", "0", "--log-dir", str(tmp_path / "logs")],
                             environ={})
    demo, runtime = create_app(settings, engines={MODEL: RecordingEngine(name=MODEL, delay_s=0.0)})
    url, _ = serve(demo, runtime, settings, block=False, server_name="127.0.0.1", server_port=None)
    try:
        yield url
    finally:
        demo.close()
        runtime.service.store.close()


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    with served([], tmp_path_factory.mktemp("open")) as url:
        yield url


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory):
    with served(["--auth", f"{USER}:{PASSWORD}"], tmp_path_factory.mktemp("locked")) as url:
        yield url


def logged_in(url: str) -> httpx.Client:
    session = httpx.Client(base_url=url, timeout=30)
    assert session.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
    return session


@pytest.mark.parametrize("app_fixture", ["open_app", "locked_app"])
def test_uploads_are_refused_before_the_body_is_read(request, app_fixture):
    url = request.getfixturevalue(app_fixture)
    big = b"x" * (4 * 1024 * 1024)
    answer = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.bin", big)}, timeout=30)
    assert answer.status_code == 413
    assert answer.text == "This demo takes no file uploads."
    if app_fixture == "locked_app":  # logging in does not open it either
        assert logged_in(url).post("/gradio_api/upload", files={"files": ("a.txt", b"hi")}).status_code == 413


def test_the_login_page_does_not_embed_the_api_description(locked_app):
    page = httpx.get(locked_app, timeout=30).text
    assert '"auth_required":true' in page  # gradio's login page ...
    assert "window.gradio_api_info = null;" in page  # ... with its API description cut out
    assert MODEL not in page and "named_endpoints" not in page and "/chat" not in page
    assert httpx.get(f"{locked_app}gradio_api/info", timeout=30).status_code == 401  # as the route itself says


def test_after_login_the_page_and_the_api_are_whole(locked_app):
    session = logged_in(locked_app)
    page = session.get("/").text
    assert "named_endpoints" in page and "/chat" in page and MODEL in page
    assert session.get("/gradio_api/info").status_code == 200
    client = Client(locked_app, auth=(USER, PASSWORD), verbose=False)
    assert chat(client, "hello", MODEL).reply.startswith("Hello from the recording engine.")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_crafted_queue_requests_get_one_sentence_and_no_traceback(open_app, capfd):
    join = f"{open_app}gradio_api/queue/join"
    unknown = httpx.post(join, json={"data": ["a"], "fn_index": 9999, "session_hash": "s1"}, timeout=30)
    assert (unknown.status_code, unknown.text) == (422, "No event has fn_index 9999.")
    info = Client(open_app, verbose=False).view_api(return_format="dict", print_info=False)
    assert "/chat" in info["named_endpoints"]
    chat_fn = next(d["id"] for d in httpx.get(f"{open_app}config", timeout=30).json()["dependencies"]
                   if d.get("api_name") == "chat")
    short = httpx.post(join, json={"data": [1], "fn_index": chat_fn, "session_hash": "s2"}, timeout=30)
    assert short.status_code == 422 and short.text.startswith("This event takes ")
    uvicorn_log, seen = logging.getLogger("uvicorn.error"), Records()
    uvicorn_log.addHandler(seen)
    try:
        with contextlib.suppress(httpx.HTTPError):  # gradio ends this stream abruptly
            httpx.get(f"{open_app}gradio_api/queue/data", params={"session_hash": "never-joined"}, timeout=10)
        time.sleep(0.5)
    finally:
        uvicorn_log.removeHandler(seen)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    lines = [r for r in seen.records if "malformed request" in r.getMessage()]
    assert lines and all(r.exc_info is None and "\n" not in r.getMessage() for r in lines)
    assert chat(Client(open_app, verbose=False), "still fine", MODEL).notice == ""  # and the app still serves


@pytest.mark.browser
def test_a_browser_still_logs_in_through_the_page_without_the_api_description(locked_app):
    """The login page works with window.gradio_api_info = null, and after login the app is there."""
    from playwright.sync_api import expect, sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(locked_app)
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_placeholder("Type a message and press Enter").first).to_be_visible(timeout=30_000)
        browser.close()
    assert not errors


def test_before_login_a_crafted_queue_request_learns_nothing_about_events(locked_app):
    answer = httpx.post(f"{locked_app}gradio_api/queue/join", json={"data": [], "fn_index": 9999, "session_hash": "s"},
                        timeout=30)
    assert answer.status_code == 401  # gradio's own answer, not "No event has fn_index 9999."
    assert httpx.get(f"{locked_app}openapi.json", timeout=30).status_code == 404
