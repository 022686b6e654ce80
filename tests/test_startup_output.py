"""What the console says when the app starts serving: the local URL once, no gradio hint that
contradicts --share, on a failed share link the app's own single line instead of gradio's, each
Hugging Face Hub warning once, whether moderation is on once, and the operator's instructions (how to add
a judge, a second model) in the log rather than on the page.

The app is the real one, started through ``app.serve()`` in-process (scripted engine) with the
share-link service pointed at a closed local port, so no test needs the network.
Run: .venv-test/bin/python -m pytest tests/test_startup_output.py -q
"""

from __future__ import annotations

import logging
import socket

import httpx
import pytest

from app import create_app, serve
from tests.engines import RecordingEngine
from vicuna_demo.config import load_settings


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """served(argv) -> (local url, share url, printed stdout + stderr)."""
    started = []

    def start(argv, capfd, **overrides):
        settings = load_settings([*argv, "--log-dir", str(tmp_path / "logs"), "--moderation", "off"], environ={})
        demo, runtime = create_app(settings, engines={"Rec": RecordingEngine("Rec")})
        started.append((demo, runtime))
        capfd.readouterr()
        url, share_url = serve(demo, runtime, settings, block=False, server_name="127.0.0.1", **overrides)
        printed = capfd.readouterr()
        return url, share_url, printed.out + printed.err

    yield start
    for demo, runtime in started:
        demo.close()
        runtime.close()


def test_without_share_the_local_url_is_printed_and_gradio_share_hint_is_not(served, capfd):
    url, share_url, printed = served([], capfd)
    assert share_url is None
    assert printed.count(f"* Running on local URL:  {url}") == 1
    assert "share=True" not in printed and "public link" not in printed
    assert "Share link:" not in printed
    assert httpx.get(url, timeout=10).status_code == 200


def test_a_failed_share_link_gives_only_the_app_s_own_line(served, capfd):
    url, share_url, printed = served(["--share"], capfd, share_server_address=f"127.0.0.1:{closed_port()}")
    assert share_url is None
    assert "Could not create share link" not in printed  # gradio's own multi-line explanation
    assert "share=True" not in printed
    share_lines = [line for line in printed.splitlines() if "share" in line.lower() and "WARNING" not in line
                   and not line.startswith("!!")]
    assert len(share_lines) == 1 and share_lines[0].startswith("Share link: not created")
    assert url in share_lines[0]
    assert printed.count(f"* Running on local URL:  {url}") == 1
    assert httpx.get(url, timeout=10).status_code == 200


def test_a_hub_warning_is_printed_once():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import logging, app, huggingface_hub.utils._http; app.setup_logging('INFO'); "
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("Retrying in 1s") == 1


# -- what the operator reads, and what visitors do not ---------------------------------------------------------

def page_texts(url: str) -> list[str]:
    config = httpx.get(url + "config", timeout=10).json()
    return [str(c.get("props", {}).get("value", "")) for c in config["components"]]


@pytest.mark.parametrize("argv, environ", [([], {}), (["--moderation", "off"], {}),
                                           ([], {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})],
                         ids=["auto-without-key", "off", "with-key"])
def test_the_start_up_log_says_once_whether_moderation_is_on(tmp_path, caplog, monkeypatch, argv, environ):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    settings = load_settings([*argv, "--log-dir", str(tmp_path / "logs")], environ={})
    demo, runtime = create_app(settings, engines={"Rec": RecordingEngine("Rec")})
    runtime.close()
    said = [r.getMessage() for r in caplog.records if "moderation" in r.getMessage().lower()]
    assert len(said) == 1, said
    assert ("OFF" in said[0]) == ("OPENAI_API_KEY" not in environ)
    assert "sk-test" not in caplog.text


def test_operator_instructions_go_to_the_start_up_log_and_the_page_says_what_a_visitor_can_do(
        launch_app, caplog):
    caplog.set_level(logging.INFO)
    url, runtime = launch_app(["--moderation", "off", "--log-dir", ""], engines={"Solo": RecordingEngine("Solo")})
    shown = "\n".join(page_texts(url))
    for operator_words in ("--judge", "--model", "--endpoint", "--log-dir", "OPENAI_API_KEY", "Start the app",
                           "start the app"):
        assert operator_words not in shown, operator_words
    assert "Content moderation is OFF" in shown and "only Solo is loaded here" in shown
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "Add one with --judge NAME" in said
    assert "two or more --model or --endpoint entries" in said
    assert "--log-dir '': conversations and votes are not kept" in said


def component(url: str, elem_id: str) -> dict:
    config = httpx.get(url + "config", timeout=10).json()
    [found] = [c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    return found["props"]


def test_ask_the_judge_is_hidden_without_a_judge_and_shown_with_one(launch_app):
    engines = {"A": RecordingEngine("A"), "B": RecordingEngine("B")}
    url, _ = launch_app(["--moderation", "off"], engines=engines)
    assert component(url, "compare-judge")["visible"] is False
    assert component(url, "compare-judge-output")["visible"] is False
    url, _ = launch_app(["--moderation", "off", "--judge", "B"], engines=dict(engines))
    assert component(url, "compare-judge")["visible"] is True
    assert component(url, "compare-judge-output")["visible"] is True


# -- the port ---------------------------------------------------------------------------------------------------

def test_when_the_default_port_is_taken_the_app_says_which_port_it_serves_on_instead(served, capfd, monkeypatch):
    """The default port is 7860 (GRADIO_SERVER_PORT changes it: here, to a port this test holds, so that other
    apps on the machine cannot make the result a race)."""
    import gradio.http_server
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        monkeypatch.setenv("GRADIO_SERVER_PORT", str(taken))
        monkeypatch.setattr(gradio.http_server, "INITIAL_PORT_VALUE", taken)  # gradio read the variable at import
        url, _, printed = served([], capfd)
    used = int(url.rstrip("/").rsplit(":", 1)[1])
    assert used != taken
    said = [line for line in printed.splitlines() if "in use" in line]
    assert said == [f"Port {taken} is in use (another app, or another copy of this one), so this demo serves on "
                    f"port {used} instead; --port chooses one."], printed


def test_a_free_port_is_used_without_a_word_about_ports(served, capfd):
    port = closed_port()
    url, _, printed = served(["--port", str(port)], capfd)
    assert url.rstrip("/").endswith(f":{port}") and "in use" not in printed


def test_a_taken_port_given_with_port_stops_the_app_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "app.py", "--port", str(port), "--moderation", "off", "--log-dir", str(tmp_path),
             "--endpoint", "name=E,base_url=http://127.0.0.1:9/v1,model=m"],
            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120,
            env={k: v for k, v in __import__("os").environ.items() if not k.startswith("VICUNA_DEMO_")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "GRADIO_SERVER_PORT" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --port {port}: the port is in use (another app, or another copy of this one). Choose another "
        "port, or leave --port out to take the next free one from 7860.")
