"""What a remote endpoint's failure means for the user: one line per kind of error of the OpenAI client
(key refused, wrong URL, rate limit, context too long, a penalty the server does not take, time-outs,
broken or malformed streams). ``RemoteEngine.describe_error`` adds the endpoint and scrubs its key."""

from __future__ import annotations

from typing import Any

import openai


class MalformedChunk(ValueError):
    """A stream chunk that is not a chat-completion chunk."""


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def server_message(exc: openai.APIStatusError) -> str:
    """The human part of an error answer: ``{"error": {"message": ...}}``, ``{"detail": ...}``, or the text."""
    body: Any = getattr(exc, "body", None)
    for _ in range(2):  # unwrap {"error": {"message": ...}} and FastAPI's {"detail": ...}
        if isinstance(body, dict):
            body = next((body[k] for k in ("error", "message", "detail") if body.get(k)), body)
    if body is None or body == "":
        try:
            body = exc.response.text
        except Exception:  # noqa: BLE001 - a streamed error body may be unreadable
            body = ""
    return _one_line(body)


def describe(exc: BaseException, *, who: str, key_env: str | None, model: str, timeout_s: float,
             midway: bool = False) -> str:
    """One line for the user about ``exc`` from endpoint ``who``: what went wrong, what to do (not yet
    redacted: the engine scrubs its key from it)."""
    key_hint = (f"check the key in the environment variable {key_env}" if key_env else
                "the endpoint needs a key: add key_env=VARIABLE to its --endpoint spec")
    if isinstance(exc, openai.AuthenticationError):
        text = f"{who} refused the API key (401 Unauthorized): {key_hint}."
    elif isinstance(exc, openai.PermissionDeniedError):
        text = (f"{who} denied access (403 Forbidden): the key may not be allowed to use model {model!r}; "
                f"{key_hint}.")
    elif isinstance(exc, openai.NotFoundError):
        text = (f"{who} answered 404 Not Found: check that base_url is the API root (it usually ends in /v1) "
                f"and that the server serves model {model!r}.")
    elif isinstance(exc, openai.RateLimitError):
        retry = exc.response.headers.get("retry-after", "") if exc.response is not None else ""
        when = f" in {retry.strip()} s" if retry.strip().replace(".", "", 1).isdigit() else " in a moment"
        text = (f"{who} is rate limiting requests or is overloaded (429 Too Many Requests). "
                f"Please retry{when}.")
    elif isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)):
        detail = server_message(exc)
        lowered = detail.lower()
        if "context" in lowered and any(w in lowered for w in ("length", "maximum", "too long", "exceed")):
            text = (f"The conversation is too long for {who}'s context window; press Clear to start a new "
                    f"one, or shorten the message. The server said: {detail}")
        elif "repetition_penalty" in lowered:
            text = (f"{who} does not accept a repetition penalty (the OpenAI API has none; vLLM, SGLang, TGI "
                    f"and FastChat's servers do): set it to 1.0 for this model. The server said: {detail}")
        else:
            text = f"{who} rejected the request ({exc.status_code}): {detail or 'no reason given'}"
    elif isinstance(exc, openai.APIStatusError):
        detail = server_message(exc)
        text = (f"{who} failed with an error ({exc.status_code})" + (f": {detail}" if detail else "")
                + ". Please retry.")
    elif isinstance(exc, openai.APITimeoutError):
        text = (f"{who} sent nothing for {timeout_s:.0f} s in the middle of the reply; it was abandoned."
                if midway else f"{who} did not answer within {timeout_s:.0f} s. Please retry later.")
    elif isinstance(exc, openai.APIConnectionError):
        if midway:
            text = (f"The connection to {who} broke in the middle of the reply; the reply is incomplete. "
                    "Please retry.")
        else:
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "connection error"
            text = f"Cannot reach {who} ({cause}): is the server running and the URL right?"
    elif isinstance(exc, openai.APIError):  # an error event inside the stream
        body = exc.body if isinstance(exc.body, str) else getattr(exc, "message", "")
        text = f"{who} reported an error in the middle of the reply: {_one_line(body) or 'no detail'}"
    elif isinstance(exc, MalformedChunk):
        text = f"{who} sent a malformed stream: {exc}. The reply was stopped."
    elif isinstance(exc, ValueError):  # JSON that does not parse
        text = f"{who} sent a malformed stream chunk (not valid JSON). The reply was stopped."
    else:
        text = f"The request to {who} failed ({type(exc).__name__}). Please retry."
    return text
