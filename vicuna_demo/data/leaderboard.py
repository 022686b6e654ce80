"""Print an arena leaderboard (Bradley-Terry ratings with 95% CIs) from a battle file.

The file holds battles in FastChat's clean-battle shape (``model_a``, ``model_b``, ``winner``,
optionally ``counted``, ``conv_metadata``, ``conversation_a`` / ``conversation_b``), as JSONL (what
``python -m vicuna_demo.data.export --battles`` writes) or as one JSON array. Rows whose winner is not
``model_a``/``model_b``/``tie``/``tie (bothbad)``, that lack model names, or that put one model on both
sides are skipped, and so are rows with ``"counted": false`` unless ``--include-uncounted``; the counts
go to stderr. See ratings.py and contextual.py for the method (weak prior, intervals, provisional models,
style control, reweighting).

Run::

    python -m vicuna_demo.data.leaderboard battles.jsonl [--json] [--bootstrap N] [--seed S]
        [--min-battles N] [--include-uncounted] [--style-control [--style-reg R]] [--reweight]
        [--ci bootstrap|sandwich] [--category LABEL]

``--category code`` (or ``multi_turn``, ``long_query``, ``lang:en``...) rates only the battles with that
label: ``categories`` as the export writes it, else FastChat's ``is_code`` / ``turn`` / ``language``.
``--style-control`` fits answer length and markdown (headers, lists, bold) beside the ratings (style.py):
each battle's counts come from its ``conv_metadata`` when present, else from its ``conversation_a`` /
``conversation_b``; a battle with neither is skipped. ``--reweight`` weighs each battle by
1 / max(battles of its pair, 50); ``--ci sandwich`` gives closed-form intervals from one fit.

The table lists ranked models first, then the provisional ones (fewer than ``--min-battles``
battles, default 20) apart, without a rank and with "too few votes" for an interval.
``--json`` prints ``{"min_battles": N, "models": [{"model", "rating", "ci_lower", "ci_upper",
"battles", "rank", "provisional"}, ...]}``, best rating first, with ``rank`` null for a provisional
model; with ``--style-control`` it adds ``"style_coefficients": {feature: log-odds per standard
deviation}``. A missing or malformed file exits 1 with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from vicuna_demo.data.ratings import (CI_METHODS, MIN_BATTLES, STYLE_REG, WINNERS, Board, ModelRating, fit_board,
                                      interval_text)
from vicuna_demo.data.categories import labels_from_row
from vicuna_demo.data.style import StyleCounts, counts_from_conversation, counts_from_metadata

NO_STYLE = "no style counts (conv_metadata or conversation_a/b)"


class BattleFileError(Exception):
    """The battle file cannot be read or is not JSON / JSONL of objects."""


def load_rows(path: str | Path) -> list[dict]:
    """Read a JSONL file or a JSON array file of battle objects."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BattleFileError(f"cannot read {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BattleFileError(f"{path}: not valid JSON ({exc})") from None
        numbered = list(enumerate(rows, start=1))
        where = "item"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise BattleFileError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        where = "line"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise BattleFileError(f"{path}: {where} {number} is not a JSON object")
    return [row for _, row in numbered]


def style_of(row: dict) -> tuple[StyleCounts, StyleCounts] | None:
    """A battle row's (side A, side B) style counts: its ``conv_metadata``, else its conversations."""
    meta = row.get("conv_metadata")
    if isinstance(meta, dict):
        counts = counts_from_metadata(meta)
        if counts is not None:
            return counts
    conversation_a, conversation_b = row.get("conversation_a"), row.get("conversation_b")
    if isinstance(conversation_a, list) and isinstance(conversation_b, list):
        return counts_from_conversation(conversation_a), counts_from_conversation(conversation_b)
    return None


def select_battles(rows: Iterable[dict], *, include_uncounted: bool = False, with_style: bool = False,
                   category: str | None = None):
    """(battles, skipped, styles): the (model_a, model_b, winner) battles to rate, a Counter of skipped rows
    by reason, and with ``with_style`` each kept battle's style counts (a row without any is skipped), else
    None. ``category``: only battles with that label (categories.py)."""
    battles, skipped, styles = [], Counter(), []
    for row in rows:
        model_a, model_b, winner = row.get("model_a"), row.get("model_b"), row.get("winner")
        style = None
        if not (isinstance(model_a, str) and model_a and isinstance(model_b, str) and model_b):
            skipped["missing model names"] += 1
        elif winner not in WINNERS:
            skipped["winner not one of " + "/".join(WINNERS)] += 1
        elif model_a == model_b:
            skipped["same model on both sides"] += 1
        elif not include_uncounted and row.get("counted", True) is False:
            skipped["not counted"] += 1
        elif category is not None and category not in labels_from_row(row):
            skipped[f"not in category {category}"] += 1
        elif with_style and (style := style_of(row)) is None:
            skipped[NO_STYLE] += 1
        else:
            battles.append((model_a, model_b, winner))
            styles.append(style)
    return battles, skipped, styles if with_style else None


def format_table(rows: list[ModelRating], min_battles: int = MIN_BATTLES) -> str:
    """Aligned text table: rank, model, rating, 95% CI as +up/-down, battles; provisional models apart."""
    if not rows:
        return "no battles to rate"
    header = ("rank", "model", "rating", "95% CI", "battles")
    ranked = [r for r in rows if not r.provisional]
    provisional = [r for r in rows if r.provisional]
    body = [(str(r.rank) if r.rank is not None else "-", r.model, f"{r.rating:.0f}", interval_text(r), str(r.battles))
            for r in ranked + provisional]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left_aligned = {1}
    lines = []
    for number, line in enumerate([header, *body]):
        if number == len(ranked) + 1 and provisional:
            lines.append(f"provisional (fewer than {min_battles} battles, not ranked):")
        cells = [c.ljust(w) if i in left_aligned else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def to_json(rows: list[ModelRating], min_battles: int = MIN_BATTLES, board: Board | None = None) -> dict:
    result = {"min_battles": min_battles, "models": [
        {"model": r.model, "rating": r.rating, "ci_lower": r.ci_lower, "ci_upper": r.ci_upper,
         "battles": r.battles, "rank": r.rank, "provisional": r.provisional}
        for r in rows
    ]}
    if board is not None and board.style_coefficients is not None:
        result["style_coefficients"] = board.style_coefficients
    return result


def format_coefficients(coefficients: dict[str, float]) -> str:
    return "style coefficients (log-odds per standard deviation): " + ", ".join(
        f"{name} {value:+.3f}" for name, value in coefficients.items())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vicuna_demo.data.leaderboard",
        description="Bradley-Terry leaderboard with 95% CIs from a battle JSONL / JSON file.",
    )
    parser.add_argument("battles", metavar="BATTLES", help="battle file (JSONL or JSON array)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--bootstrap", type=int, default=100, metavar="N", help="bootstrap rounds (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default 0)")
    parser.add_argument("--min-battles", type=int, default=MIN_BATTLES, metavar="N",
                        help=f"battles a model needs to be ranked; fewer: provisional (default {MIN_BATTLES})")
    parser.add_argument("--include-uncounted", action="store_true",
                        help='also rate rows marked "counted": false')
    parser.add_argument("--style-control", action="store_true",
                        help="fit answer length and markdown beside the ratings (LMArena's style control)")
    parser.add_argument("--style-reg", type=float, default=STYLE_REG, metavar="R",
                        help=f"L2 strength on the style coefficients, arena-rank's scale (default {STYLE_REG:g})")
    parser.add_argument("--reweight", action="store_true",
                        help="weigh each battle by 1 / max(battles of its pair, 50) (LMArena's rule)")
    parser.add_argument("--category", metavar="LABEL",
                        help="only battles with this label: code, multi_turn, long_query, lang:en ... "
                             "(FastChat's data: lang:English)")
    parser.add_argument("--ci", choices=CI_METHODS, default="bootstrap",
                        help="interval method: bootstrap (default) or sandwich (closed form, one fit)")
    args = parser.parse_args(argv)
    if not args.style_reg >= 0:
        parser.error("--style-reg must be >= 0")
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    if args.min_battles < 0:
        parser.error("--min-battles must be >= 0")

    try:
        rows = load_rows(args.battles)
    except BattleFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    battles, skipped, styles = select_battles(rows, include_uncounted=args.include_uncounted,
                                              with_style=args.style_control, category=args.category)
    models = {m for a, b, _ in battles for m in (a, b)}
    summary = f"{_plural(len(battles), 'battle')} between {_plural(len(models), 'model')} rated from {args.battles}"
    if skipped:
        summary += f"; skipped {_plural(sum(skipped.values()), 'row')} (" + ", ".join(
            f"{n} {reason}" for reason, n in sorted(skipped.items())) + ")"
    print(summary, file=sys.stderr)

    board = fit_board(battles, style=styles, style_reg=args.style_reg, reweight=args.reweight, ci=args.ci,
                      bootstrap_rounds=args.bootstrap, seed=args.seed, min_battles=args.min_battles)
    if args.json:
        print(json.dumps(to_json(board.rows, args.min_battles, board), indent=2))
    else:
        print(format_table(board.rows, args.min_battles))
        if board.style_coefficients is not None:
            print(format_coefficients(board.style_coefficients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
