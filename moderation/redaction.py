"""Keeping secrets out of text that is logged or shown: the one redaction helper of the project.

    scrub(error_text, secrets=(api_key,))   # -> one line, keys and credential-looking tokens replaced

It lives in this leaf package because the moderator needs it first; the app uses it too.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

# Anything that looks like a credential in error text, even one we were not given (defence in depth).
_CREDENTIAL_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)\S+"),
    re.compile(r"(?i)((?:api[-_]?key|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
    re.compile(r"\bsk-[A-Za-z0-9_*\-]{6,}"),
)


def scrub(text: str, secrets: tuple[str, ...] = (), limit: int = 300) -> str:
    """Remove `secrets` and credential-looking tokens from `text`, and shorten it to `limit` chars."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern in _CREDENTIAL_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
