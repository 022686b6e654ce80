"""Helpers for the reliability tests: start the real app in-process, and drive its /chat API through
gradio_client the way a visitor's browser does (message, model, system prompt, the three sliders), then
read back the chatbot, the notice line and the reply text; and stop an app started as a subprocess."""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass

from gradio_client import Client


@contextlib.contextmanager
def running_app(argv, engines, environ=None):
    """The real app on a free local port -> (url, runtime); closed on exit. For module-scoped fixtures."""
    from app import create_app
    from vicuna_demo.config import load_settings
    settings = load_settings(list(argv), environ=environ or {})
    demo, runtime = create_app(settings, engines=engines)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield url, runtime
    finally:
        demo.close()
        runtime.service.store.close()


def text_of(message: dict) -> str:
    """A chatbot message's text (gradio 6 sends content as a list of blocks)."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return "" if content is None else str(content)


@dataclass
class ChatResult:
    chatbot: list[dict]
    notice: str

    @property
    def reply(self) -> str:
        """The last assistant message (reply, notice quote and statistics line), '' if none."""
        for message in reversed(self.chatbot):
            if message["role"] == "assistant":
                return text_of(message)
        return ""

    @property
    def users(self) -> list[str]:
        return [text_of(m) for m in self.chatbot if m["role"] == "user"]

    @property
    def assistants(self) -> list[str]:
        return [text_of(m) for m in self.chatbot if m["role"] == "assistant"]


def submit_chat(client: Client, message, model: str, *, system="", temperature=0.7, top_p=1.0, max_tokens=64):
    """Start a /chat job (not waiting)."""
    return client.submit(message, model, system, temperature, top_p, max_tokens, api_name="/chat")


def chat(client: Client, message, model: str, *, timeout: float = 60.0, **params) -> ChatResult:
    """Send one message and wait (at most ``timeout`` seconds) for the final update."""
    chatbot, _textbox, notice = submit_chat(client, message, model, **params).result(timeout=timeout)
    return ChatResult(chatbot=chatbot, notice=notice or "")


def stop_app(proc: subprocess.Popen) -> None:
    """End an app started as a subprocess (``python app.py``): terminate, then kill after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
