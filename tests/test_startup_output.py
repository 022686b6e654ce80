"""What the console says when the app starts serving: the local URL once, no gradio hint that
contradicts --share, on a failed share link the app's own single line instead of gradio's, and each
Hugging Face Hub warning once.

The app is the real one, started through ``app.serve()`` in-process (scripted engine) with the
share-link service pointed at a closed local port, so no test needs the network.
Run: .venv-test/bin/python -m pytest tests/test_startup_output.py -q
"""

from __future__ import annotations

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
