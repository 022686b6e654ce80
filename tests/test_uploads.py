"""Uploads and request bodies on the app as `python app.py` serves it (app.serve: launch_kwargs and its
middleware), driven over raw HTTP, gradio_client and a real browser.

- with a judge, a question file is the one upload accepted: a good one is stored, any other file, a file
  with bad lines (each named), two files or an oversized one is refused before gradio stores anything;
- request bodies are capped on every route before they are read, before login too;
- crafted /evaluate requests (a path never uploaded, wrong types) get one line back, no traceback;
- the Evaluate tab in chromium: upload, run, results, and the progress bar drawn once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil

import httpx
import pytest
from gradio_client import Client, handle_file

from tests.engines import RecordingEngine
from tests.judge_server import JudgeServer, judged_answers

USER, PASSWORD = "alice", "pw"
GOOD = ('{"question_id": 1, "category": "writing", "turns": ["Write one sentence about the sea."]}\n'
        '{"question_id": 2, "category": "math", "turns": ["What is 6 times 7?"], "reference": ["42"]}\n')
MiB = 1024 * 1024


def judge_prefers_koala(messages):
    try:
        first, _ = judged_answers(messages)
    except ValueError:
        return "Fine. [[6]]"
    return "Compared. " + ("[[A]]" if "Koala" in first else "[[B]]")


@contextlib.contextmanager
def served(tmp_path, *extra, judge_delay_s=0.0):
    from app import create_app, serve
    from vicuna_demo.config import load_settings
    with JudgeServer(judge_prefers_koala, delay_s=judge_delay_s) as judge:
        settings = load_settings(["--endpoint", judge.endpoint("Judge"), "--judge", "Judge", *extra,
                                  "--moderation", "off", "--rate-limit", "0", "--log-dir", str(tmp_path / "logs")],
                                 environ={})
        engines = {"Koala": RecordingEngine("Koala", "Koala says the sea is wide.", delay_s=0.0),
                   "Alpaca": RecordingEngine("Alpaca", "Alpaca says 42.", delay_s=0.0)}
        demo, runtime = create_app(settings, engines=engines)
        url, _ = serve(demo, runtime, settings, block=False, server_name="127.0.0.1", server_port=None)
        try:
            yield url, judge, runtime
        finally:
            demo.close()
            runtime.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served(tmp_path_factory.mktemp("judged")) as running:
        yield running


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    with served(tmp_path_factory.mktemp("locked"), "--auth", f"{USER}:{PASSWORD}") as running:
        yield running


def upload(url, *files, client=None):
    return (client or httpx).post(f"{url}gradio_api/upload", files=[("files", f) for f in files], timeout=30)


def test_a_good_question_file_is_the_one_upload_accepted(app):
    url, _, _ = app
    answer = upload(url, ("questions.jsonl", GOOD.encode()))
    assert answer.status_code == 200, answer.text
    [stored] = answer.json()
    assert stored.endswith("questions.jsonl")


@pytest.mark.parametrize("name, data, message", [
    ("cat.png", b"\x89PNG\r\n\x1a\n", "cat.png: only question files are accepted here"),
    ("q.jsonl", b"\xff\xfe not utf-8", "q.jsonl: not a UTF-8 text file."),
    ("q.jsonl", b"", "q.jsonl: no questions"),
])
def test_other_files_are_refused_with_a_reason(app, name, data, message):
    answer = upload(app[0], (name, data))
    assert answer.status_code == 422 and answer.text.startswith(message), answer.text


def test_a_question_file_with_bad_lines_names_every_bad_line(app):
    bad = (GOOD + 'not json\n{"question_id": 3, "turns": ["a", "b", "c"]}\n{"question_id": 1, "turns": ["x"]}\n'
           '{"question_id": 4, "turns": ["ok"], "reference": [7]}\n')
    answer = upload(app[0], ("mt.jsonl", bad.encode()))
    assert answer.status_code == 422
    lines = answer.text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["mt.jsonl, line 3", "mt.jsonl, line 4", "mt.jsonl, line 5",
                                                      "mt.jsonl, line 6"]
    assert "not valid JSON" in lines[0] and "3 turns" in lines[1] and "already used on line 1" in lines[2]
    assert "reference must be a list of strings" in lines[3]


def test_two_files_or_an_oversized_file_are_refused(app):
    url = app[0]
    two = upload(url, ("a.jsonl", GOOD.encode()), ("b.jsonl", GOOD.encode()))
    assert (two.status_code, two.text) == (422, "Upload exactly one question file.")
    big = upload(url, ("big.jsonl", b" " * (3 * MiB)))
    assert big.status_code == 413 and big.text.startswith("The request body is larger than this demo accepts")


def chunked(total: int, piece: int = 256 * 1024):
    sent = 0
    while sent < total:
        sent += piece
        yield b"x" * piece


@pytest.mark.parametrize("route", ["gradio_api/queue/join", "login", "gradio_api/upload", "gradio_api/run/chat"])
def test_request_bodies_are_capped_on_every_route_before_login(locked, route):
    url = locked[0]
    declared = httpx.post(f"{url}{route}", content=b"{" + b" " * (9 * MiB) + b"}",
                          headers={"content-type": "application/json"}, timeout=30)
    assert declared.status_code == 413, (route, declared.status_code, declared.text[:200])
    streamed = httpx.post(f"{url}{route}", content=chunked(300 * MiB), headers={"content-type": "application/json"},
                          timeout=30)
    assert streamed.status_code == 413  # refused once past the cap: 300 MB are never read
    session = httpx.Client(base_url=url, timeout=30)
    assert session.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
    assert upload(url, ("q.jsonl", GOOD.encode()), client=session).status_code == 200  # the cap spares a real one


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def raw_evaluate(url: str, data: list, session: str) -> dict:
    """/evaluate through gradio's queue over plain HTTP, as a crafted client would: -> the last message."""
    fn_index = next(d["id"] for d in httpx.get(f"{url}config", timeout=30).json()["dependencies"]
                    if d.get("api_name") == "evaluate")
    joined = httpx.post(f"{url}gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                             "session_hash": session}, timeout=30)
    assert joined.status_code == 200, joined.text
    last: dict = {}
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=60) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                last = json.loads(line[5:])
                if last.get("msg") == "process_completed":
                    break
    return last


def test_crafted_evaluate_requests_get_one_line_and_no_traceback(app, capfd):
    url, _, _ = app
    seen = Records()
    for name in ("uvicorn.error", "gradio", ""):
        logging.getLogger(name).addHandler(seen)
    try:
        never_uploaded = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}, "orig_name": "q.jsonl"}
        done = raw_evaluate(url, ["Koala", "Alpaca", "pairwise", never_uploaded, 16], "crafted-path")
        assert done["success"] is False and "\n" not in str(done["output"].get("error"))
        done = raw_evaluate(url, ["Koala", "Alpaca", "pairwise", {"path": 7}, 16], "crafted-type")
        assert done["success"] is False and "\n" not in str(done["output"].get("error"))
        done = raw_evaluate(url, ["Koala", "Alpaca", "pairwise", None, "lots"], "crafted-number")
        assert done["success"] is False or done["output"]["data"][0]
    finally:
        for name in ("uvicorn.error", "gradio", ""):
            logging.getLogger(name).removeHandler(seen)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert all(r.exc_info is None for r in seen.records), [r.getMessage() for r in seen.records if r.exc_info]


@pytest.mark.browser
def test_the_evaluate_tab_takes_a_question_file_in_the_browser_and_draws_one_progress_bar(app, tmp_path):
    if not shutil.which("/usr/bin/chromium"):
        pytest.skip("chromium is not installed")
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=30_000)       # a 2-core machine shared with other test runs
    url, judge, _ = app
    good, bad = tmp_path / "questions.jsonl", tmp_path / "bad.jsonl"
    good.write_text(GOOD)
    bad.write_text('{"question_id": 1, "turns": []}\n')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(url)
        page.get_by_role("tab", name="📋 Evaluate").click()
        page.locator("#evaluate-questions input[type=file]").set_input_files(str(bad))
        expect(page.get_by_text("has 0 turns").first).to_be_visible()     # refused at upload, with the reason
        for _ in range(3):    # a fresh upload after the refused one (retried: the input may not listen yet)
            page.locator("#evaluate-questions input[type=file]").set_input_files(str(good))
            try:
                expect(page.locator("#evaluate-questions").get_by_label("questions.jsonl")).to_be_visible(
                    timeout=10_000)
                break
            except AssertionError:
                continue
        expect(page.locator("#evaluate-questions").get_by_label("questions.jsonl")).to_be_visible()
        judge.delay_s = 0.3   # slow enough to see the run in progress
        page.locator("#evaluate-run").click()
        expect(page.locator(".progress-text, .progress-level").first).to_be_visible()
        # gradio draws a status tracker (progress bar, timer) over each output it shows progress on: sample the
        # page while the run is in progress
        seen = []
        for _ in range(100):
            seen.append(page.evaluate("() => [...document.querySelectorAll('[data-testid=status-tracker]')].filter("
                                      "t => t.getBoundingClientRect().height > 0 && t.innerText.trim()).map(t => "
                                      "(t.closest('[id]') || {}).id)"))
            if len([s for s in seen if s]) >= 3 or "Done" in page.locator("#evaluate-status").inner_text():
                break
            page.wait_for_timeout(100)
        drawn = [s for s in seen if s]
        assert drawn and all(s == ["evaluate-status"] for s in drawn), seen
        expect(page.locator("#evaluate-status")).to_contain_text("Done", timeout=120_000)
        expect(page.locator("#evaluate-summary")).to_contain_text("Koala wins 2")
        judge.delay_s = 0.0
        browser.close()
