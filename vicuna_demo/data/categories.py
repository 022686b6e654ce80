"""Category labels of an arena battle, from its first prompt: by deterministic rules (no I/O but the
language model's one-time load), and what a judge model's classification of the prompt means (the
question, the strict reading of its answer, the labels; services/after_vote.py asks it).

Labels by rules (a battle may have several):

- ``code``: the prompt holds a fenced code block, or lines that read as code (a ``def``/``class``/
  ``import``/``#include``/``function`` line, or several lines ending in ``;`` or ``{``);
- ``multi_turn``: the visitor sent more than one message in the battle;
- ``long_query``: the first prompt is at least LONG_QUERY_TOKENS tokens (style.count_tokens; LMArena's
  cut-off);
- ``lang:xx``: the prompt's language, ISO 639-1, by ``langid`` (PyPI, 5 MB, offline, about 10-50 ms a
  prompt on 2 cores after a one-time load of a few seconds), when it is at least MIN_LANGUAGE_CHARS
  characters long and langid is at least LANGUAGE_CONFIDENCE sure; otherwise no language label.

Labels by the judge (what rules cannot decide), from one JSON object of booleans it answers
(``JUDGE_KEYS``), as LMArena's categories define them:

- ``math``, ``creative_writing``, ``instruction_following``: its answer for each;
- ``hard_prompt``: at least HARD_MIN_CRITERIA of the seven hardness criteria (``HARD_CRITERIA``:
  specificity, domain knowledge, complexity, problem solving, creativity, technical accuracy, real-world
  application) hold.

An answer that is not exactly one JSON object with a boolean for every key gives no label.
``category_tag`` writes the answer in the shape FastChat/LMArena's clean battles carry it.
"""

from __future__ import annotations

import json
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


HARD_CRITERIA = ("specificity", "domain_knowledge", "complexity", "problem_solving", "creativity",
                 "technical_accuracy", "real_world")
HARD_MIN_CRITERIA = 6
JUDGE_KEYS = HARD_CRITERIA + ("math", "creative_writing", "instruction_following")
JUDGE_LABELS = ("math", "creative_writing", "instruction_following", "hard_prompt")
JUDGE_PROMPT_CHARS = 4000   # the prompt is cut to this many characters for the judge: one short call
_QUESTIONS = {
    "specificity": "it asks for one clearly defined output, not an open chat",
    "domain_knowledge": "answering well needs knowledge of one or more specialised fields",
    "complexity": "it has several parts, steps or variables to reason about together",
    "problem_solving": "the answer has to work a problem out, not only recall or describe",
    "creativity": "it calls for an original or inventive approach",
    "technical_accuracy": "the answer must be technically exact to be any good",
    "real_world": "it is a practical task someone faces in real life or work",
    "math": "answering it needs mathematical reasoning or calculation",
    "creative_writing": "it asks for original writing: a story, poem, lyrics, script, dialogue or the like",
    "instruction_following": "it sets explicit, checkable constraints on the answer (format, length, words "
                             "to use or avoid, structure)",
}


def judge_messages(prompt: str) -> list[dict]:
    """The classification request for a battle's first prompt: chat messages for the judge's engine."""
    criteria = "\n".join(f'- "{key}": true when {text}.' for key, text in _QUESTIONS.items())
    text = (prompt or "")[:JUDGE_PROMPT_CHARS]
    system = ("You sort the prompts people send to a chatbot into categories. You never answer the prompt "
              "itself. You reply with one JSON object and nothing else.")
    user = (f"Read the prompt between the <prompt> tags and decide, for each key below, whether it holds.\n"
            f"{criteria}\n\n<prompt>\n{text}\n</prompt>\n\nReply with exactly one JSON object whose keys are "
            f"{', '.join(JUDGE_KEYS)}, each true or false.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def parse_judge_answer(text: str) -> dict[str, bool] | None:
    """The judge's answer as {key: bool} for every JUDGE_KEYS key, or None when it is anything but one JSON
    object (a single ```json fence around it is allowed) with a boolean for each key; other keys are ignored."""
    body = (text or "").strip()
    fenced = _FENCED.fullmatch(body)
    try:
        answer = json.loads(fenced.group(1) if fenced else body)
    except ValueError:
        return None
    if not isinstance(answer, dict) or any(not isinstance(answer.get(key), bool) for key in JUDGE_KEYS):
        return None
    return {key: answer[key] for key in JUDGE_KEYS}


def judge_labels(answer: dict[str, bool]) -> list[str]:
    """The labels a parsed judge answer gives (JUDGE_LABELS' order)."""
    labels = [key for key in ("math", "creative_writing", "instruction_following") if answer[key]]
    if sum(answer[key] for key in HARD_CRITERIA) >= HARD_MIN_CRITERIA:
        labels.append("hard_prompt")
    return labels


def category_tag(answer: dict | None) -> dict | None:
    """A parsed judge answer in FastChat/LMArena's clean-battle ``category_tag`` shape (None for anything that is
    not a whole answer, e.g. a row written by other code)."""
    if not isinstance(answer, dict) or any(not isinstance(answer.get(key), bool) for key in JUDGE_KEYS):
        return None
    return {"criteria_v0.1": {key: answer[key] for key in HARD_CRITERIA},
            "math_v0.1": {"math": answer["math"]},
            "creative_writing_v0.1": {"creative_writing": answer["creative_writing"],
                                      "score": "yes" if answer["creative_writing"] else "no"},
            "if_v0.1": {"if": answer["instruction_following"]}}


def _tag_labels(tag) -> set[str]:
    """The judge labels a FastChat/LMArena ``category_tag`` gives (its public battles carry one)."""
    if not isinstance(tag, dict):
        return set()
    labels = set()
    for label, (group, key) in {"math": ("math_v0.1", "math"), "creative_writing": ("creative_writing_v0.1",
                                "creative_writing"), "instruction_following": ("if_v0.1", "if")}.items():
        if isinstance(tag.get(group), dict) and tag[group].get(key) is True:
            labels.add(label)
    criteria = tag.get("criteria_v0.1")
    if isinstance(criteria, dict) and sum(criteria.get(key) is True for key in HARD_CRITERIA) >= HARD_MIN_CRITERIA:
        labels.add("hard_prompt")
    return labels


def labels_from_row(row: dict) -> set[str]:
    """A clean-battle row's labels: ours (``categories``), else what FastChat's fields say (``is_code``,
    ``turn``, ``language``: FastChat writes names, so its battles read ``lang:English``; ``category_tag``:
    math, creative_writing, instruction_following, hard_prompt)."""
    if isinstance(row.get("categories"), list):
        return {str(label) for label in row["categories"]}
    labels = _tag_labels(row.get("category_tag"))
    if row.get("is_code") is True:
        labels.add("code")
    if isinstance(row.get("turn"), int) and row["turn"] > 1:
        labels.add("multi_turn")
    language = row.get("language")
    if isinstance(language, str) and language:
        labels.add(f"lang:{language}")
    return labels
