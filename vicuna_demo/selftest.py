"""``python app.py --self-test``: does this install answer? The app starts exactly as for visitors (same flags,
models, middleware and launch); this waits for every model to be ready, sends one chat turn to each through the
page's own API (``/chat``, with gradio_client, as a browser's events reach the same service call), prints what
came back and returns the exit status: 0 when every model streamed a real reply, 1 otherwise.

It is the check CI runs first, in an environment built from requirements.txt alone (``.ci/run``): a reply path
that imports a module only the test requirements install fails here, not in a visitor's browser.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

PROMPT = "Say hello in one short sentence."
READY_TIMEOUT_S = 3600.0      # a first run on a GPU box downloads Vicuna-7B (13 GB) before it can answer
REPLY_TIMEOUT_S = 300.0
_STATS = re.compile(r"⏱ (\d[\d,]*) tokens?")


@dataclass(frozen=True)
class Outcome:
    model: str
    ok: bool
    detail: str      # the reply's first words and its statistics line, or why there was none


def wait_until_ready(engines: dict, say: Callable[[str], None], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Block until every engine is ready or has failed to start (its requests then say why), printing each
    status change; returns at ``timeout_s`` whatever the state."""
    deadline, last = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        pending = False
        for name, engine in engines.items():
            status = str(engine.status)
            if status != last.get(name):
                last[name] = status
                say(f"self-test: {status}")
            ready = bool(engine.ready)
            pending = pending or not (ready or "could not start" in status or "failed" in status)
        if not pending:
            return
        time.sleep(0.5)


def read_reply(chatbot: list[dict]) -> tuple[str, int, str]:
    """(reply text, tokens in its statistics line, the notice quoted under it) from /chat's chatbot value."""
    reply = ""
    for message in reversed(chatbot or []):
        if message.get("role") == "assistant":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
            reply = str(content or "")
            break
    match = _STATS.search(reply)
    tokens = int(match.group(1).replace(",", "")) if match else 0
    body, notice = reply.split("\n\n<sub>⏱", 1)[0], ""
    if body.startswith("> "):
        body, notice = "", body[2:]
    elif "\n\n> " in body:
        body, notice = body.split("\n\n> ", 1)
    return body.strip(), tokens, notice.strip()


def ask(url: str, model: str, auth: tuple[str, str] | None) -> Outcome:
    """One turn to ``model`` through the page's /chat endpoint, greedy and short."""
    from gradio_client import Client

    try:
        client = Client(url, auth=auth, verbose=False)
        chatbot, _box, notice = client.submit(PROMPT, model, "", 0.0, 1.0, 48, api_name="/chat") \
            .result(timeout=REPLY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the outcome says it
        return Outcome(model, False, f"the page's /chat call failed: {type(exc).__name__}: {exc}")
    text, tokens, quoted = read_reply(chatbot)
    if text and tokens > 0:
        words = " ".join(text.split())
        return Outcome(model, True, f"{words[:80]!r}{'…' if len(words) > 80 else ''} ({tokens} tokens)")
    why = quoted or (notice or "").strip() or "an empty reply"
    return Outcome(model, False, why)


def run(url: str, engines: dict, auth_pairs: tuple[tuple[str, str], ...] | list = (),
        say: Callable[[str], None] = print) -> int:
    """Wait for the models, ask each once, print one line per model and a verdict; -> exit status."""
    wait_until_ready(engines, say)
    auth = tuple(auth_pairs[0]) if auth_pairs else None
    outcomes = [ask(url, name, auth) for name in engines]
    for outcome in outcomes:
        say(f"self-test: {outcome.model} {'replied' if outcome.ok else 'did NOT reply'}: {outcome.detail}")
    good = sum(o.ok for o in outcomes)
    if good == len(outcomes):
        say(f"self-test passed: {good} of {len(outcomes)} model(s) answered through {url} (/chat)")
        return 0
    say(f"self-test FAILED: {len(outcomes) - good} of {len(outcomes)} model(s) gave no reply")
    return 1
