"""A moderator backed by the OpenAI moderation endpoint (`client.moderations.create`).

Each call sends one text, applies the optional per-category thresholds to the returned scores, and
answers with a `ModerationResult`. Service problems never raise: after a bounded number of
attempts the failure policy decides (on_error="block" refuses the text, "allow" lets it through
with a logged warning).

Retries: the SDK's own `timeout` bounds each attempt, but its built-in retry loop is switched off
(`max_retries=0` on the client) and done here instead, because the SDK's loop sleeps for whatever
`Retry-After` a server asks (up to two minutes per retry) and its backoff cannot be tuned. Here
the same errors are retried (connection errors, timeouts, 408/409/429/5xx) with a short capped
backoff, so a check never takes longer than `max_wait_s`:
attempts * timeout_s + max_retries * max_backoff_s. (httpx timeouts are per network operation, so
a server trickling bytes slower than timeout_s each could still stretch one attempt.)

The API key is handed to the SDK and nowhere else: error text is scrubbed before it is logged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import time
from typing import Any, Mapping
from urllib.parse import urlsplit

import openai

from .base import ModerationResult
from .redaction import scrub
from .thresholds import CATEGORIES, validate_thresholds

DEFAULT_MODEL = "omni-moderation-latest"
LOGGER_NAME = "vicuna_demo.moderation"
ON_ERROR_POLICIES = ("block", "allow")
RETRYABLE_STATUS = frozenset({408, 409, 429})
def text_digest(text: str) -> str:
    """A short, stable hash that identifies a text in logs without revealing it."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


class OpenAIModerator:
    """Moderation through the OpenAI SDK. Thread-safe: one SDK client, no per-call shared state."""

    enabled = True

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout_s: float = 5.0,
        max_retries: int = 2,
        thresholds: Mapping[str, float] | None = None,
        on_error: str = "block",
        logger: logging.Logger | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 2.0,
    ) -> None:
        if not api_key or not isinstance(api_key, str):
            raise ValueError("OpenAIModerator needs an API key (set OPENAI_API_KEY)")
        if not model or not isinstance(model, str):
            raise ValueError("The moderation model name must be a non-empty string")
        if isinstance(timeout_s, bool) or not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < math.inf):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
        if not (0 <= backoff_s <= max_backoff_s < math.inf):
            raise ValueError("backoff_s and max_backoff_s must satisfy 0 <= backoff_s <= max_backoff_s")

        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.thresholds = validate_thresholds(thresholds)
        self.on_error = on_error
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._secrets = (api_key,)
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._client = openai.OpenAI(
            api_key=api_key,
            base_url=base_url,  # None: the SDK default
            timeout=self.timeout_s,
            max_retries=0,  # retried in check(), see the module docstring
        )

    @property
    def max_wait_s(self) -> float:
        """Upper bound on how long one `check` waits for the service before giving up."""
        return (self.max_retries + 1) * self.timeout_s + self.max_retries * self.max_backoff_s

    def describe(self) -> str:
        details = [f"on error: {self.on_error}"]
        if self.thresholds:
            details.append("thresholds: " + ", ".join(f"{k}>={v:g}" for k, v in self.thresholds.items()))
        return f"Moderation: OpenAI {self.model} ({'; '.join(details)})"

    def __repr__(self) -> str:
        return f"OpenAIModerator(model={self.model!r}, on_error={self.on_error!r})"

    def close(self) -> None:
        """Release the SDK client's connections."""
        self._client.close()

    def check(self, text: str) -> ModerationResult:
        if not text or not text.strip():
            return ModerationResult.passed()
        try:
            response = self._call_with_retries(text)
            return self._interpret(response, text)
        except Exception as err:  # service problems must never reach the caller
            return self._unavailable(err, text)

    def _call_with_retries(self, text: str) -> Any:
        deadline = time.monotonic() + self.max_wait_s
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            try:
                return self._client.moderations.create(
                    input=text,
                    model=self.model,
                    timeout=max(min(self.timeout_s, remaining), 0.001),
                    extra_headers={"x-stainless-retry-count": str(attempt)},
                )
            except Exception as err:
                delay = self._retry_delay(err, attempt)
                if attempt + 1 >= attempts or delay is None or time.monotonic() + delay >= deadline:
                    raise
                self._logger.debug(
                    "Moderation attempt %d/%d failed (%s); retrying in %.2fs",
                    attempt + 1,
                    attempts,
                    self._describe_error(err),
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _retry_delay(self, err: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying after `err`, or None when it is not worth retrying."""
        if isinstance(err, openai.APIConnectionError):  # includes timeouts
            server_delay = None
        elif isinstance(err, openai.APIStatusError) and (
            err.status_code in RETRYABLE_STATUS or err.status_code >= 500
        ):
            server_delay = _retry_after_s(err.response.headers)
        else:
            return None
        backoff = min(self.backoff_s * 2**attempt, self.max_backoff_s) * (1 - 0.25 * random.random())
        if server_delay is not None:
            backoff = max(backoff, server_delay)  # honour the server, within our own cap
        return min(backoff, self.max_backoff_s)

    def _interpret(self, response: Any, text: str) -> ModerationResult:
        results = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in (response.results or [])]
        if not results:
            raise ValueError("the moderation response holds no results")
        flagged_by_service = any(bool(r.get("flagged")) for r in results)
        names: set[str] = set()
        for r in results:
            names.update(name for name, hit in (r.get("categories") or {}).items() if hit is True)
            scores = r.get("category_scores") or {}
            names.update(
                name
                for name, threshold in self.thresholds.items()
                if isinstance(scores.get(name), (int, float)) and scores[name] >= threshold
            )
        if not flagged_by_service and not names:
            return ModerationResult.passed()
        categories = _ordered(names)
        self._logger.info(
            "Moderation flagged text %s (model %s): %s",
            text_digest(text),
            self.model,
            ", ".join(categories) or "no category named",
        )
        return ModerationResult.flagged(categories)

    def _unavailable(self, err: Exception, text: str) -> ModerationResult:
        allowed = self.on_error == "allow"
        self._logger.warning(
            "Moderation service unavailable for text %s (%s); %s",
            text_digest(text),
            self._describe_error(err),
            "allowing it unchecked (on error: allow)" if allowed else "blocking it (on error: block)",
        )
        return ModerationResult.unavailable(allowed=allowed)

    def _describe_error(self, err: Exception) -> str:
        status = getattr(err, "status_code", None)
        label = type(err).__name__ + (f" {status}" if status else "")
        return f"{label}: {scrub(str(err), self._secrets)}"


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The delay a server asked for in `retry-after-ms` / `retry-after` (seconds), if any."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) / divisor
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            return value
    return None


def _ordered(names: set[str]) -> tuple[str, ...]:
    known = [name for name in CATEGORIES if name in names]
    return tuple(known + sorted(names - set(known)))


def safe_base_url_label(base_url: str | None) -> str:
    """host[:port] of a base URL for logs, without credentials, path or query."""
    if not base_url:
        return "api.openai.com (SDK default)"
    parts = urlsplit(base_url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host
