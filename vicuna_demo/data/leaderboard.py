"""Print an arena leaderboard (Bradley-Terry ratings with bootstrap 95% CIs) from a battle file.

The file holds battles in FastChat's clean-battle shape (``model_a``, ``model_b``, ``winner``,
optionally ``counted``), as JSONL (what ``python -m vicuna_demo.data.export --battles`` writes) or
as one JSON array. Rows whose winner is not ``model_a``/``model_b``/``tie``/``tie (bothbad)``,
that lack model names, or that put one model on both sides are skipped, and so are rows with
``"counted": false`` unless ``--include-uncounted``; the counts go to stderr. See ratings.py for
the method (weak prior, intervals, provisional models).

Run::

    python -m vicuna_demo.data.leaderboard battles.jsonl [--json] [--bootstrap N] [--seed S]
        [--min-battles N] [--include-uncounted]

The table lists ranked models first, then the provisional ones (fewer than ``--min-battles``
battles, default 20) apart, without a rank and with "too few votes" for an interval.
``--json`` prints ``{"min_battles": N, "models": [{"model", "rating", "ci_lower", "ci_upper",
"battles", "rank", "provisional"}, ...]}``, best rating first, with ``rank`` null for a provisional
model. A missing or malformed file exits 1 with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from vicuna_demo.data.ratings import MIN_BATTLES, WINNERS, ModelRating, compute_leaderboard, interval_text


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


def select_battles(rows: Iterable[dict], *, include_uncounted: bool = False) -> tuple[list[tuple[str, str, str]], Counter]:
    """Return the (model_a, model_b, winner) battles to rate and a Counter of skipped rows by reason."""
    battles, skipped = [], Counter()
    for row in rows:
        model_a, model_b, winner = row.get("model_a"), row.get("model_b"), row.get("winner")
        if not (isinstance(model_a, str) and model_a and isinstance(model_b, str) and model_b):
            skipped["missing model names"] += 1
        elif winner not in WINNERS:
            skipped["winner not one of " + "/".join(WINNERS)] += 1
        elif model_a == model_b:
            skipped["same model on both sides"] += 1
        elif not include_uncounted and row.get("counted", True) is False:
            skipped["not counted"] += 1
        else:
            battles.append((model_a, model_b, winner))
    return battles, skipped


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


def to_json(rows: list[ModelRating], min_battles: int = MIN_BATTLES) -> dict:
    return {"min_battles": min_battles, "models": [
        {"model": r.model, "rating": r.rating, "ci_lower": r.ci_lower, "ci_upper": r.ci_upper,
         "battles": r.battles, "rank": r.rank, "provisional": r.provisional}
        for r in rows
    ]}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vicuna_demo.data.leaderboard",
        description="Bradley-Terry leaderboard with bootstrap 95% CIs from a battle JSONL / JSON file.",
    )
    parser.add_argument("battles", metavar="BATTLES", help="battle file (JSONL or JSON array)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--bootstrap", type=int, default=100, metavar="N", help="bootstrap rounds (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default 0)")
    parser.add_argument("--min-battles", type=int, default=MIN_BATTLES, metavar="N",
                        help=f"battles a model needs to be ranked; fewer: provisional (default {MIN_BATTLES})")
    parser.add_argument("--include-uncounted", action="store_true",
                        help='also rate rows marked "counted": false')
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    if args.min_battles < 0:
        parser.error("--min-battles must be >= 0")

    try:
        rows = load_rows(args.battles)
    except BattleFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    battles, skipped = select_battles(rows, include_uncounted=args.include_uncounted)
    models = {m for a, b, _ in battles for m in (a, b)}
    summary = f"{_plural(len(battles), 'battle')} between {_plural(len(models), 'model')} rated from {args.battles}"
    if skipped:
        summary += f"; skipped {_plural(sum(skipped.values()), 'row')} (" + ", ".join(
            f"{n} {reason}" for reason, n in sorted(skipped.items())) + ")"
    print(summary, file=sys.stderr)

    leaderboard = compute_leaderboard(battles, bootstrap_rounds=args.bootstrap, seed=args.seed,
                                      min_battles=args.min_battles)
    if args.json:
        print(json.dumps(to_json(leaderboard, args.min_battles), indent=2))
    else:
        print(format_table(leaderboard, args.min_battles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
