"""Category labels of an arena battle, from its first prompt, by deterministic rules (no I/O but the
language model's one-time load).

Labels (a battle may have several):

- ``code``: the prompt holds a fenced code block, or lines that read as code (a ``def``/``class``/
  ``import``/``#include``/``function`` line, or several lines ending in ``;`` or ``{``);
- ``multi_turn``: the visitor sent more than one message in the battle;
- ``long_query``: the first prompt is at least LONG_QUERY_TOKENS tokens (style.count_tokens; LMArena's
  cut-off);
- ``lang:xx``: the prompt's language, ISO 639-1, by ``langid`` (PyPI, 5 MB, offline, about 10-50 ms a
  prompt on 2 cores after a one-time load of a few seconds), when it is at least MIN_LANGUAGE_CHARS
  characters long and langid is at least LANGUAGE_CONFIDENCE sure; otherwise no language label.

What rules cannot decide (math, creative writing, instruction following, hard prompts) needs a judge
model; see docs/arena.md.
"""

from __future__ import annotations

import re
import threading

from .style import count_tokens, without_code

LONG_QUERY_TOKENS = 500
MIN_LANGUAGE_CHARS = 12
LANGUAGE_CONFIDENCE = 0.9
CATEGORIES = ("code", "multi_turn", "long_query")  # plus lang:xx

_FENCE = re.compile(r"```")
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import |#include|function |public |fn |SELECT |for \(|"
                        r"if \(|const |let |var )", re.MULTILINE)
_STATEMENT_END = re.compile(r"[;{]\s*$", re.MULTILINE)

_identifier = None
_lock = threading.Lock()


def _language_identifier():
    """langid's identifier with normalised probabilities, loaded once; None when langid is not installed."""
    global _identifier
    with _lock:
        if _identifier is None:
            try:
                from langid.langid import LanguageIdentifier, model
            except ImportError:
                _identifier = False
            else:
                _identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        return _identifier or None


def warm() -> None:
    """Load the language model now (at start-up, in a thread), so that no vote waits for it."""
    _language_identifier()


def language(text: str) -> str | None:
    """The prompt's ISO 639-1 language when langid is sure enough, else None."""
    text = (text or "").strip()
    identifier = _language_identifier() if len(text) >= MIN_LANGUAGE_CHARS else None
    if identifier is None:
        return None
    code, confidence = identifier.classify(text)
    return code if confidence >= LANGUAGE_CONFIDENCE else None


def is_code(text: str) -> bool:
    text = text or ""
    return bool(_FENCE.search(text) or _CODE_LINE.search(text) or len(_STATEMENT_END.findall(text)) >= 2)


def rule_labels(first_prompt: str, turns: int) -> list[str]:
    """The labels rules can decide for a battle whose first prompt is ``first_prompt`` after ``turns`` turns."""
    labels = []
    if is_code(first_prompt):
        labels.append("code")
    if turns > 1:
        labels.append("multi_turn")
    if count_tokens(first_prompt) >= LONG_QUERY_TOKENS:
        labels.append("long_query")
    lang = language(without_code(first_prompt))  # the prose's language, not the code's
    if lang:
        labels.append(f"lang:{lang}")
    return labels


def labels_from_row(row: dict) -> set[str]:
    """A clean-battle row's labels: ours (``categories``), else what FastChat's fields say (``is_code``,
    ``turn``, ``language``: FastChat writes names, so its battles read ``lang:English``)."""
    if isinstance(row.get("categories"), list):
        return {str(label) for label in row["categories"]}
    labels = set()
    if row.get("is_code") is True:
        labels.add("code")
    if isinstance(row.get("turn"), int) and row["turn"] > 1:
        labels.add("multi_turn")
    language = row.get("language")
    if isinstance(language, str) and language:
        labels.add(f"lang:{language}")
    return labels
