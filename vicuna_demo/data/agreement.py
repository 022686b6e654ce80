"""Judge against people: agreement and Cohen's kappa over rounds that have both verdicts.

The MT-Bench method (FastChat's ``compute_agreement.py``): agreement "with ties" counts a tie as a verdict
of its own; "without ties" keeps only the rounds where neither side said tie. Both kinds of tie ("tie" and
"tie (bothbad)") are the same verdict here: neither answer is better. Pure functions over
(judge winner, human winner) pairs, so the leaderboard's judge view and the command line
(``python -m vicuna_demo.data.leaderboard --agreement``) share one home.
"""

from __future__ import annotations

from typing import Sequence


def same_verdict(winner: str) -> str:
    """"tie" and "tie (bothbad)" -> "tie"; "model_a" / "model_b" unchanged."""
    return "tie" if winner.startswith("tie") else winner


def agreement(pairs: Sequence[tuple[str, str]]) -> tuple[int, int]:
    """(rounds where judge and human agree, rounds with both) from (judge winner, human winner) pairs."""
    return sum(1 for judge, human in pairs if same_verdict(judge) == same_verdict(human)), len(pairs)


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters' labels: (observed - chance agreement) / (1 - chance), chance from each
    rater's own label frequencies. None without pairs or when chance agreement is 1 (one label only)."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(1 for x, y in pairs if x == y) / n
    labels = {label for pair in pairs for label in pair}
    chance = sum((sum(1 for x, _ in pairs if x == k) / n) * (sum(1 for _, y in pairs if y == k) / n) for k in labels)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def agreement_stats(pairs: Sequence[tuple[str, str]]) -> dict:
    """Agreement with ties (a tie is a verdict of its own) and without them (only rounds where neither said
    tie), each with Cohen's kappa. -> {"with_ties": {"n", "agree", "rate", "kappa"}, "without_ties": {...}}."""
    labelled = [(same_verdict(j), same_verdict(h)) for j, h in pairs]
    out = {}
    for key, chosen in (("with_ties", labelled), ("without_ties", [p for p in labelled if "tie" not in p])):
        agree = sum(1 for x, y in chosen if x == y)
        kappa = cohen_kappa(chosen)
        out[key] = {"n": len(chosen), "agree": agree, "rate": round(agree / len(chosen), 4) if chosen else None,
                    "kappa": None if kappa is None else round(kappa, 4)}
    return out
