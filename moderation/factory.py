"""Builds the moderator the app asked for from its settings and the environment.

mode "auto" uses OpenAI when a key is available (argument or OPENAI_API_KEY) and otherwise turns
moderation off with one logged warning; "openai" insists on a key; "off" never checks. Whatever the mode,
the console gets one line about moderation, from here (the app adds none of its own). The
endpoint is the explicit base_url argument, else OPENAI_BASE_URL, else the SDK default.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

from .base import Moderator, NoModerator
from .openai_moderator import DEFAULT_MODEL, LOGGER_NAME, OpenAIModerator, safe_base_url_label

MODES = ("auto", "openai", "off")


def _from_env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def create_moderator(
    mode: str = "auto",
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    model: str = DEFAULT_MODEL,
    timeout_s: float = 5.0,
    max_retries: int = 2,
    thresholds: Mapping[str, float] | None = None,
    on_error: str = "block",
    logger: logging.Logger | None = None,
) -> Moderator:
    """Return the moderator for `mode` ("auto" | "openai" | "off"); see the module docstring."""
    log = logger or logging.getLogger(LOGGER_NAME)
    normalized = (mode or "").strip().lower()
    if normalized not in MODES:
        raise ValueError(f"Unknown moderation mode {mode!r}; expected one of: {', '.join(MODES)}")
    if normalized == "off":
        log.info(NoModerator().describe())
        return NoModerator()

    key = (api_key or "").strip() or _from_env("OPENAI_API_KEY")
    if key is None:
        if normalized == "openai":
            raise ValueError(
                "Moderation mode 'openai' needs an OpenAI API key: set the OPENAI_API_KEY environment "
                "variable (or pass api_key), or run with --moderation off to disable moderation."
            )
        log.warning(
            "OPENAI_API_KEY is not set, so moderation is OFF: messages are not checked. "
            "Set OPENAI_API_KEY to enable it, or pass --moderation off to silence this warning."
        )
        return NoModerator()

    endpoint = (base_url or "").strip() or _from_env("OPENAI_BASE_URL")
    moderator = OpenAIModerator(
        api_key=key,
        base_url=endpoint,
        model=model,
        timeout_s=timeout_s,
        max_retries=max_retries,
        thresholds=thresholds,
        on_error=on_error,
        logger=log,
    )
    log.info("%s via %s", moderator.describe(), safe_base_url_label(endpoint))
    return moderator
