"""Reading a judge's verdict out of its text, tolerantly, and combining the two answer orders.

Pairwise verdicts are ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie); single grades are ``[[rating]]``,
a number from 1 to 10. Judges explain first and decide last, so the LAST well-formed verdict in
the text counts (a judge that quotes the format while explaining is not misread). Spaces inside
the brackets, lower case, bold (``**[[A]]**``), ``[[Tie]]`` and ``[[7/10]]`` are accepted. A text
without a well-formed verdict, or with a rating outside 1-10, gives ``None``: "no verdict", which
is counted and reported, never guessed.

With FastChat's own prompts (``--judge-prompts``) its rules apply instead (``parse_pair_fastchat``,
``parse_rating_fastchat``): the first of ``[[A]]``, ``[[B]]``, ``[[C]]`` found in that order, and the first
``[[n]]`` (else ``[n]``) as a grade.

Both orders: game 1 shows model A's answer first, game 2 shows model B's answer first. A verdict
counts only when both games name the same model; when they disagree the round is a tie (position
bias cancelled), and when either game gave no verdict the round has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_VERDICT = "no_verdict"
_PAIR = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
_RATING = re.compile(r"\[\[\s*(?:rating\s*[:=]?\s*)?(\d{1,2}(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]", re.IGNORECASE)


def parse_pair(text: str) -> str | None:
    """'A', 'B', 'tie' or None (no verdict) from a pairwise judgment."""
    found = _PAIR.findall(text or "")
    if not found:
        return None
    last = found[-1].upper()
    return "tie" if last in ("C", "TIE") else last


def parse_pair_fastchat(text: str) -> str | None:
    """FastChat's rule (gen_judgment with its own prompts): "[[A]]" anywhere wins, else "[[B]]", else "[[C]]"
    is a tie; nothing else is accepted."""
    for mark, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in (text or ""):
            return verdict
    return None


_FASTCHAT_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


def parse_rating_fastchat(text: str) -> float | None:
    """FastChat's rule: the first ``[[n]]``, else the first ``[n]``; no range check (FastChat keeps any number)."""
    for pattern in _FASTCHAT_RATING:
        found = pattern.search(text or "")
        if found:
            return float(found.group(1))
    return None


def parse_rating(text: str) -> float | None:
    """The 1-10 grade from a single-answer judgment, or None (no verdict, or out of range)."""
    found = _RATING.findall(text or "")
    if not found:
        return None
    score = float(found[-1])
    return score if 1.0 <= score <= 10.0 else None


@dataclass(frozen=True)
class PairVerdict:
    """Both games of one pairwise comparison, in model_a / model_b terms."""

    g1: str | None            # game 1 (A's answer first): "model_a" | "model_b" | "tie" | None
    g2: str | None            # game 2 (B's answer first)

    @property
    def winner(self) -> str:
        """"model_a" | "model_b" | "tie" | "no_verdict"."""
        if self.g1 is None or self.g2 is None:
            return NO_VERDICT
        return self.g1 if self.g1 == self.g2 else "tie"

    @property
    def orders_disagree(self) -> bool:
        """True when both games gave a verdict and they differ (the round became a tie)."""
        return self.g1 is not None and self.g2 is not None and self.g1 != self.g2


def game_winner(verdict: str | None, *, first: str, second: str) -> str | None:
    """A game's 'A' / 'B' / 'tie' -> the model it names ("model_a"/"model_b"), given who was shown first."""
    return {"A": first, "B": second, "tie": "tie"}.get(verdict) if verdict else None


def combine(g1_text_verdict: str | None, g2_text_verdict: str | None) -> PairVerdict:
    """Raw verdicts of game 1 (A first) and game 2 (B first) -> PairVerdict."""
    return PairVerdict(g1=game_winner(g1_text_verdict, first="model_a", second="model_b"),
                       g2=game_winner(g2_text_verdict, first="model_b", second="model_a"))


def explain(verdict: PairVerdict, name_a: str = "Model A", name_b: str = "Model B") -> str:
    """One sentence for people: who won, and why it is a tie or has no verdict."""
    names = {"model_a": name_a, "model_b": name_b}
    if verdict.winner == NO_VERDICT:
        missing = [n for n, g in (("the first", verdict.g1), ("the second", verdict.g2)) if g is None]
        return (f"No verdict: the judge gave no [[A]]/[[B]]/[[C]] verdict in {' and '.join(missing)} answer order, "
                "so this round is not counted.")
    if verdict.orders_disagree:
        said = {g: names.get(g, "a tie") for g in (verdict.g1, verdict.g2)}
        return (f"Tie: the two answer orders disagree (with {name_a}'s answer first the judge chose "
                f"{said[verdict.g1]}, with {name_b}'s first it chose {said[verdict.g2]}), so the verdict is a tie.")
    if verdict.winner == "tie":
        return "Tie: the judge called it a tie in both answer orders."
    return f"{names[verdict.winner]} wins: the judge chose it in both answer orders."
