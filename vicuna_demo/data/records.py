"""What the store keeps, as Python values: the record of a model turn, a human vote and a judge verdict,
the values their fields may take, and how a row's columns map to and from them (no I/O; storage.py writes
and reads them, export.py and the ratings use the same facts).

- ``WINNERS``: a human vote's winner (FastChat's clean-battle values); ``JUDGE_WINNERS``: a judge's, which
  adds "no_verdict"; ``SIDES``: a turn's side in a comparison (None outside one).
- ``TURN_COLUMNS`` / ``VOTE_COLUMNS`` / ``JUDGE_COLUMNS`` / ``LABEL_COLUMNS``: the tables' columns in the records'
  field order (see migrations.py for the schema); ``JSON_TURN_COLUMNS`` and ``JSON_LABEL_COLUMNS`` are stored
  as JSON text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
JUDGE_WINNERS = ("model_a", "model_b", "tie", "no_verdict")
SIDES = (None, "a", "b")


@dataclass(frozen=True)
class TurnRecord:
    conversation_id: str
    turn_index: int
    tstamp: float
    client_hash: str
    model: str
    template: str
    params: dict  # {"temperature": .., "top_p": .., "max_new_tokens": ..}
    messages: list[dict]  # OpenAI-style messages sent to the model, system included, after context fitting
    reply: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error" | "moderated"
    n_tokens: int
    ttft_s: float | None
    tok_s: float | None
    moderation: str  # moderation status, e.g. "passed" | "flagged" | "unavailable" | "off"
    moderation_categories: tuple[str, ...]
    error: str | None = None
    battle_id: str | None = None
    side: str | None = None  # "a" / "b" for comparison turns


@dataclass(frozen=True)
class VoteRecord:
    battle_id: str
    tstamp: float
    client_hash: str
    anony: bool
    model_a: str
    model_b: str
    winner: str  # "model_a" | "model_b" | "tie" | "tie (bothbad)"
    counted: bool
    not_counted_reason: str | None  # e.g. "identity_leak", "error", "moderated"
    conversation_a_id: str
    conversation_b_id: str
    conv_metadata: dict | None = None  # both answers' style counts (style.conv_metadata), None if unknown
    shown: dict | None = None  # per side of the last round: {"tokens", "chars", "status"}; None if unknown
    categories: list | None = None  # labels of the battle's first prompt (categories.py); None if unknown
    sampling: dict | None = None  # anonymous: {"weights": {model: w}, "pair_probability": p} when the pair was drawn


@dataclass(frozen=True)
class JudgeVoteRecord:
    """A judge's verdict on a side-by-side round, asked in both answer orders (see services/judge.py)."""

    battle_id: str
    tstamp: float
    client_hash: str             # the visitor who asked for the verdict
    judge: str                   # the judge model's name
    prompt: str                  # the judge prompt's name, e.g. "pair-v1"
    model_a: str
    model_b: str
    winner: str                  # "model_a" | "model_b" | "tie" | "no_verdict"
    g1_winner: str | None        # model_a's answer shown first: "model_a" | "model_b" | "tie" | None
    g2_winner: str | None        # model_b's answer shown first
    g1_judgment: str
    g2_judgment: str
    error: str | None
    n_turns: int
    conversation_a_id: str
    conversation_b_id: str


@dataclass(frozen=True)
class LabelRecord:
    """Category labels a labeller gave a battle's first prompt after the vote (services/after_vote.py)."""

    battle_id: str
    tstamp: float
    labeller: str                # "judge:<model name>", or "rules"
    labels: list                 # e.g. ["math", "hard_prompt"]; [] when the labeller found none
    answer: dict | None = None   # the labeller's parsed answer (the judge's criteria), None for rules


def is_moderated(turn: dict | TurnRecord) -> bool:
    """True when a turn's reply was withheld or flagged by moderation (export omits such replies)."""
    get = turn.get if isinstance(turn, dict) else lambda k: getattr(turn, k)
    return get("finish_reason") == "moderated" or get("moderation") == "flagged"


TURN_COLUMNS = tuple(
    "conversation_id turn_index tstamp client_hash model template params messages reply "
    "finish_reason n_tokens ttft_s tok_s moderation moderation_categories error battle_id side".split()
)
VOTE_COLUMNS = tuple(
    "battle_id tstamp client_hash anony model_a model_b winner counted not_counted_reason "
    "conversation_a_id conversation_b_id conv_metadata shown categories sampling".split()
)
JSON_VOTE_COLUMNS = ("conv_metadata", "shown", "categories", "sampling")
JUDGE_COLUMNS = tuple(
    "battle_id tstamp client_hash judge prompt model_a model_b winner g1_winner g2_winner g1_judgment "
    "g2_judgment error n_turns conversation_a_id conversation_b_id".split()
)
LABEL_COLUMNS = ("battle_id", "tstamp", "labeller", "labels", "answer")
JSON_LABEL_COLUMNS = ("labels", "answer")
JSON_TURN_COLUMNS = ("params", "messages", "moderation_categories")


def encode_json(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def turn_from_row(row: Mapping[str, Any]) -> TurnRecord:
    values = {c: json.loads(row[c]) if c in JSON_TURN_COLUMNS else row[c] for c in TURN_COLUMNS}
    values["moderation_categories"] = tuple(values["moderation_categories"])
    return TurnRecord(**values)


def content_text(content: Any) -> str:
    """Message content as text; accepts a string or a list of {"type": "text", "text": ...} blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return str(content)


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""
