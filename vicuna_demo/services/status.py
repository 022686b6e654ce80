"""What the page says about each model: a short state for everyone ("ready", "loading weights") and the
details for whoever asks (the engine's full status line, what its KV cache holds).

    for s in model_statuses(service): print(s.name, s.state, s.detail)
    starting(statuses)      # True while any model is still loading or warming up

Nothing here needs gradio; the UI only renders these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .chat import ChatService
from ..engines.protocol import Engine


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: str        # a few words: "ready", "loading weights", "warming up", "could not start"
    ready: bool
    failed: bool
    detail: str       # the full line: the engine's status while starting (or failed), what it holds once ready


def _short(name: str, status: str) -> str:
    """'Tiny: loading weights (1 of 2 models)' -> 'loading weights'; 'X: loaded; waiting ...' -> 'loaded'."""
    text = status.removeprefix(f"{name}:").strip() or "starting"
    return re.split(r"\s*[(;]", text, maxsplit=1)[0].strip() or text


def model_status(engine: Engine) -> ModelStatus:
    status, ready = engine.status, engine.ready
    failed = not ready and ("could not start" in status or "failed" in status)
    if ready:
        return ModelStatus(engine.name, "ready", True, False, engine.capacity)
    detail = status.removeprefix(f"{engine.name}:").strip()
    return ModelStatus(engine.name, _short(engine.name, status), False, failed, detail)


def model_statuses(service: ChatService) -> list[ModelStatus]:
    return [model_status(engine) for engine in service.engines.values()]


def starting(statuses: list[ModelStatus]) -> bool:
    """True while any model is still on its way (a failed one is not: nothing more will happen to it)."""
    return any(not s.ready and not s.failed for s in statuses)
