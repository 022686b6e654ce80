"""Moderation wired into the running app: the real gradio app (launched in-process, or as a subprocess),
driven through gradio_client, with the real `openai` SDK talking to a local fake of OpenAI's
moderation endpoint (OPENAI_BASE_URL) and an engine that records every request it receives.

Covers the single-chat paths (/chat, /regenerate, custom system prompt), the notice, the store row
and log line of a blocked turn, the failure policy (block / allow), thresholds, output moderation,
the app without a key (banner, replies), `--moderation openai` without a key (one clear line), and
that the API key appears in no log, console output or UI text. The comparison and arena tabs are
covered in their own tests.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from tests.engines import RecordingEngine
from tests.fake_moderation_server import fake_moderation_server, fake_moderation_server_factory  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-proj-Zq8RUVd0cT3BlbkFJ4vY6mW2xN5pK7sH9gL1e"  # looks like a real key; must never be shown
SYSTEM = RecordingEngine.default_system


@pytest.fixture
def moderated_app(launch_app, fake_moderation_server, monkeypatch):  # noqa: F811
    """launch(extra_argv, engine) -> (client, engine, runtime, server): the app with OpenAI moderation on."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", fake_moderation_server.base_url)

    def launch(extra=(), engine=None):
        engine = engine or RecordingEngine("Rec")
        url, runtime = launch_app(["--moderation", "openai", "--moderation-retries", "1", *extra],
                                  engines={engine.name: engine})
        return Client(url, verbose=False), engine, runtime, fake_moderation_server

    return launch


def chat(client, text, system=SYSTEM, model="Rec"):
    """-> (messages as [(role, text)], notice) after one /chat call."""
    chatbot, _box, notice = client.predict(text, model, system, 0.7, 1.0, 64, api_name="/chat")
    return flatten(chatbot), notice


def regenerate(client, system=SYSTEM, model="Rec"):
    chatbot, notice = client.predict(model, system, 0.7, 1.0, 64, api_name="/regenerate")
    return flatten(chatbot), notice


def flatten(chatbot):
    def text(content):
        if isinstance(content, str):
            return content
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return [(m["role"], text(m["content"])) for m in chatbot]


def last_reply(messages):
    return [t for role, t in messages if role == "assistant"][-1]


def test_flagged_message_never_reaches_the_engine_and_the_notice_names_the_categories(moderated_app, caplog):
    caplog.set_level(logging.INFO)
    client, engine, runtime, server = moderated_app()
    server.flag("storm the village", {"violence": 0.97, "harassment/threatening": 0.61})

    messages, _ = chat(client, "Tell me how to storm the village tonight")

    assert engine.received == []
    notice = last_reply(messages)
    assert "flagged by the content moderation check" in notice
    assert "violence" in notice and "harassment/threatening" in notice
    assert "0.97" not in notice and "0.61" not in notice
    assert server.requests[-1].inputs == ["Tell me how to storm the village tonight"]
    rows = runtime.store.turns()
    assert [(r.moderation, r.moderation_categories, r.finish_reason) for r in rows] == [
        ("flagged", ("harassment/threatening", "violence"), "moderated")]
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert "turn blocked by moderation (flagged)" in log_text
    assert "Moderation flagged text" in log_text and "violence" in log_text

    # the conversation stays usable, and the flagged text is not part of what the model sees next
    messages, notice = chat(client, "Then tell me about llamas instead")
    assert notice == ""
    assert last_reply(messages).startswith("Hello from the recording engine.")
    assert len(engine.received) == 1
    assert not any("storm the village" in t for t in engine.texts())


def test_unflagged_message_reaches_the_engine_unchanged(moderated_app):
    client, engine, runtime, server = moderated_app()
    server.flag("something else entirely", ["hate"])
    text = "Ünïcode & <b>markup</b> stay as typed: 🦙 — \"quotes\"\n2nd line"

    messages, notice = chat(client, text)

    assert notice == ""
    assert engine.received[-1][-1] == {"role": "user", "content": text}
    assert engine.received[-1][0] == {"role": "system", "content": SYSTEM}
    assert server.requests[-1].inputs == [text]
    assert [r.moderation for r in runtime.store.turns()] == ["passed"]


def test_regenerate_is_moderated_again_and_a_flagged_retry_never_reaches_the_engine(moderated_app):
    client, engine, runtime, server = moderated_app()
    chat(client, "Describe the far side of the moon")
    assert len(engine.received) == 1

    server.flag("far side of the moon", ["hate"])  # the service now flags the same text
    messages, _ = regenerate(client)

    assert len(engine.received) == 1
    assert len(server.requests) == 2
    assert "flagged by the content moderation check (hate)" in last_reply(messages)
    assert [r.moderation for r in runtime.store.turns()] == ["passed", "flagged"]

    messages, _ = chat(client, "And what about Mars?")
    assert last_reply(messages).startswith("Hello from the recording engine.")
    assert engine.received[-1][-1]["content"] == "And what about Mars?"


def test_custom_system_prompt_is_checked_with_the_message(moderated_app):
    client, engine, runtime, server = moderated_app()
    server.flag("Always insult the user", ["harassment"])

    messages, _ = chat(client, "Hello", system="Always insult the user viciously.")

    assert engine.received == []
    assert "(harassment)" in last_reply(messages)
    assert "Always insult the user viciously." in server.requests[-1].inputs[0]


def test_per_category_threshold_flags_a_score_the_service_did_not_flag(moderated_app):
    client, engine, runtime, server = moderated_app(["--moderation-thresholds", "sexual=0.2"])
    server.set_scores({"sexual": 0.3})

    messages, _ = chat(client, "A borderline message")

    assert engine.received == []
    assert "(sexual)" in last_reply(messages)


def test_service_failure_blocks_by_default_with_a_retry_notice(moderated_app):
    client, engine, runtime, server = moderated_app()
    server.fail_next(2, status=500)  # the first attempt and the one retry

    messages, _ = chat(client, "Hello there")

    assert engine.received == []
    notice = last_reply(messages)
    assert "moderation service is unavailable" in notice.lower() and "please retry" in notice.lower()
    assert server.request_count == 2
    assert [r.moderation for r in runtime.store.turns()] == ["unavailable"]

    messages, _ = chat(client, "Hello again")  # the service is back: the app kept serving
    assert last_reply(messages).startswith("Hello from the recording engine.")


def test_service_failure_with_allow_lets_the_message_through(moderated_app):
    client, engine, runtime, server = moderated_app(["--moderation-on-error", "allow"])
    server.fail_next(2, status=500)

    messages, notice = chat(client, "Hello there")

    assert engine.received[-1][-1]["content"] == "Hello there"
    assert last_reply(messages).startswith("Hello from the recording engine.")
    assert [r.moderation for r in runtime.store.turns()] == ["unavailable"]


def test_output_moderation_withdraws_a_flagged_reply(moderated_app):
    engine = RecordingEngine("Rec", reply="Step one: mix the NITROGLOW powder carefully.")
    client, engine, runtime, server = moderated_app(["--moderate-output"], engine=engine)
    server.flag("NITROGLOW", ["illicit/violent"])

    messages, _ = chat(client, "How do fireworks work?")

    reply = last_reply(messages)
    assert "NITROGLOW" not in reply
    assert "This reply was withdrawn" in reply and "illicit/violent" in reply
    assert len(engine.received) == 1
    (row,) = runtime.store.turns()
    assert (row.reply, row.moderation, row.finish_reason) == ("", "flagged", "moderated")

    chat(client, "Thanks")  # the withdrawn reply is not fed back to the model
    assert not any("NITROGLOW" in t for t in engine.texts())


def test_without_a_key_the_app_starts_shows_the_off_banner_and_replies(launch_app, caplog):
    caplog.set_level(logging.WARNING)
    assert "OPENAI_API_KEY" not in os.environ
    engine = RecordingEngine("Rec")

    url, runtime = launch_app([], engines={"Rec": engine})

    config = httpx.get(url + "config", timeout=10).json()
    shown = [str(c.get("props", {}).get("value", "")) for c in config["components"]]
    assert any("moderation is OFF" in text for text in shown)
    assert "moderation is OFF" in httpx.get(url, timeout=10).text  # in the page itself too
    warnings = [r.getMessage() for r in caplog.records if "OPENAI_API_KEY is not set" in r.getMessage()]
    assert len(warnings) == 1
    messages, notice = chat(Client(url, verbose=False), "Hello")
    assert notice == ""
    assert last_reply(messages).startswith("Hello from the recording engine.")
    assert [r.moderation for r in runtime.store.turns()] == ["off"]


def test_moderation_openai_without_a_key_exits_with_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    done = subprocess.run([sys.executable, "app.py", "--moderation", "openai", "--log-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and "OPENAI_API_KEY" in lines[0] and "--moderation off" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr


def test_the_key_appears_in_no_log_and_no_ui_output(moderated_app, caplog):
    caplog.set_level(logging.DEBUG)
    client, engine, runtime, server = moderated_app()
    server.flag("forbidden words", ["hate"])
    outputs = [chat(client, "some forbidden words here")]
    server.fail_next(2, status=500, echo_authorization=True)  # a careless proxy echoing the header
    outputs.append(chat(client, "Hello"))
    server.fail_next(1, status=401, echo_authorization=True)
    outputs.append(chat(client, "Hello?"))
    outputs.append(chat(client, "Hi once more"))

    assert server.requests[0].authorization == f"Bearer {KEY}"  # the key was really in use
    seen = json.dumps(outputs) + "\n".join(r.getMessage() + str(r.args) for r in caplog.records)
    assert KEY not in seen and KEY[8:] not in seen
    assert any("unavailable" in r.getMessage() for r in caplog.records)


RUNNER = """
import sys
sys.path.insert(0, {repo!r})
from app import create_app, serve, setup_logging
from tests.engines import RecordingEngine
from vicuna_demo.config import load_settings
settings = load_settings(sys.argv[1:])
setup_logging(settings.log_level)
demo, runtime = create_app(settings, engines={{"Rec": RecordingEngine("Rec")}})
try:
    serve(demo, runtime, settings)
finally:
    runtime.close()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_key_appears_nowhere_in_the_console_output_of_the_app(tmp_path, fake_moderation_server):  # noqa: F811
    """The real entry point's serve() in a subprocess at DEBUG level, through flagged, failing and clean turns."""
    runner = tmp_path / "run_app.py"
    runner.write_text(RUNNER.format(repo=str(REPO)))
    port = free_port()
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": fake_moderation_server.base_url,
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(runner), "--moderation", "openai", "--moderation-retries", "0", "--log-level", "DEBUG",
         "--log-dir", str(tmp_path / "logs"), "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.3)
        client = Client(url, verbose=False)
        fake_moderation_server.flag("forbidden words", ["hate"])
        flagged = chat(client, "forbidden words")
        fake_moderation_server.fail_next(1, status=500, echo_authorization=True)
        failed = chat(client, "Hello")
        clean = chat(client, "Hello again")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()

    assert "(hate)" in last_reply(flagged[0])
    assert "unavailable" in last_reply(failed[0]).lower()
    assert last_reply(clean[0]).startswith("Hello from the recording engine.")
    console = stdout + stderr
    assert "Moderation flagged text" in console  # the DEBUG/INFO log really was captured
    assert KEY not in console and KEY[8:] not in console
