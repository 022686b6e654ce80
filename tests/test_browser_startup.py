"""Issue 15, the real start-up in a real browser: ``python app.py`` serves the page before its model is ready.

The app runs as a user starts it, in a subprocess, on a Hub id (``--model someone/tiny-llama``) that it has
never downloaded: a first run. The Hub is tests/fake_hub.py (``HF_ENDPOINT``), which serves a tiny Llama
folder and holds the weights file's download until the test releases it. That is what makes the order
certain rather than a race: the model cannot be ready before the release, so the page must already be
served, show the model's loading status, and take a chat message that waits for the model. Once the
weights arrive the model loads and warms up, the waiting message is answered (with its statistics line),
and the start-up status line says the model is ready.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.chat_client import stop_app
from tests.fake_hub import FakeHub

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STATS = re.compile(r"\d+ tokens · first token \d+\.\d+ s · \d+\.\d+ tok/s")
HUB_ID = "someone/tiny-llama"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory, embedded_tokenizer):
    """A tiny random Llama (two layers) with the embedded SmolLM2's tokenizer and chat template, as a Hub
    repository holds it; built from the tokenizer alone (seconds), without loading the embedded model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("hub-repo")
    tok = embedded_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_app_py_serves_the_page_and_its_status_before_the_model_and_answers_once_ready(
        tmp_path, tiny_model_folder):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is missing: apt-get install -y chromium (scripts/test.sh does it)"
    port = free_port()
    app_log = tmp_path / "app.log"
    with FakeHub(HUB_ID, tiny_model_folder, hold={"model.safetensors"}) as hub, open(app_log, "w") as log:
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OPENAI_API_KEY") and not k.startswith("VICUNA_DEMO_")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / "hub-cache"), PYTHONUNBUFFERED="1",
                   GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        proc = subprocess.Popen([sys.executable, "app.py", "--model", f"{HUB_ID},name=Tiny", "--device", "cpu",
                                 "--port", str(port), "--log-dir", str(tmp_path / "logs"), "--rate-limit", "0",
                                 "--max-new-tokens", "24"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            # 1. the page is served while the weights are still downloading (they cannot arrive yet)
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, app_log.read_text()
                assert time.monotonic() < deadline, "the page was not served while the model's weights downloaded"
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            assert hub.held.wait(60), "the app never asked for the model's weights"

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page()
                    page.goto(url)
                    # 2. it shows the model's start-up progress: the model is loading its weights
                    status = page.locator("#model-status")
                    expect(status).to_contain_text("Tiny · ⏳ loading weights (replies start when it is ready)",
                                                   timeout=30_000)

                    # 3. a message sent now waits for the model: shown, not answered, no error
                    chatbot = page.locator("#chatbot")
                    page.locator("#chat-input textarea").fill("Hello there, are you awake?")
                    page.locator("#chat-send").click()
                    expect(chatbot).to_contain_text("Hello there, are you awake?", timeout=10_000)
                    time.sleep(2.0)      # the turn is in the app, waiting on the model (it cannot be ready)
                    waiting = chatbot.inner_text()
                    assert not STATS.search(waiting) and "⚠️" not in waiting, waiting
                    expect(status).to_contain_text("Tiny · ⏳ loading weights")
                    assert proc.poll() is None

                    # 4. the weights arrive: the model loads and warms up, the waiting message is answered ...
                    hub.release()
                    expect(chatbot).to_contain_text(STATS, timeout=90_000)
                    answered = chatbot.inner_text()
                    assert "⚠️" not in answered and answered.index("are you awake?") < STATS.search(answered).start()
                    # ... and the start-up status turns into the ready models' list
                    expect(status).to_contain_text("Tiny · ✅ ready", timeout=30_000)
                    expect(status).not_to_contain_text("loading weights")
                    # a visitor arriving now sees the same (the page's first status refresh replaces the
                    # start-up text the page was built with)
                    page.reload()
                    expect(page.locator("#chatbot")).to_be_visible()
                    expect(page.locator("#model-status")).to_contain_text("Tiny · ✅ ready", timeout=10_000)
                finally:
                    browser.close()
        finally:
            stop_app(proc)
    output = app_log.read_text()
    assert "Traceback" not in output, output
    assert "Tiny: ready" in output, output
    # the order the page showed is the order the app logged: served first, weights loaded after
    assert output.index("Running on local URL") < output.index("Tiny: loaded"), output
