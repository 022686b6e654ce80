"""Judge against people: agreement and Cohen's kappa over the battles that have both verdicts.

The MT-Bench method (FastChat's ``compute_agreement.py``): agreement "with ties" counts a tie as a verdict
of its own; "without ties" keeps only the rounds where neither side said tie. Both kinds of tie ("tie" and
"tie (bothbad)") are the same verdict here: neither answer is better. The functions are pure, over
(judge winner, human winner) pairs: the leaderboard's judge view and this command line share them.

Run::

    python -m vicuna_demo.data.agreement [--log-dir logs | --database URI|env] [--json]
    python -m vicuna_demo.data.agreement --battles battles.jsonl --judge-votes judge_votes.jsonl [--json]

From the store (default: the app's ``logs/vicuna_demo.sqlite3``, read-only): every battle with both a
visitor's vote (the first) and a judge verdict (the latest that gave one), as the judge view counts them.
From the files of ``python -m vicuna_demo.data.export --battles ... --judge-votes ...``: the same pairing
on ``question_id`` (the battle id), the judge's ``counted`` verdict per battle. ``--json`` prints
``{"source", "with_ties": {"n", "agree", "rate", "kappa"}, "without_ties": {...}}``. A store or file that
cannot be read exits 1 with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
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


# -- the command line -------------------------------------------------------------------------------
def pairs_from_files(battles: str | Path, judge_votes: str | Path) -> list[tuple[str, str]]:
    """(judge winner, human winner) per battle of an export: the battle file's first vote per
    ``question_id`` and the judge file's ``counted`` verdict (else the latest with a verdict). Raises OSError
    or ValueError (with the file and line) for a file that is not JSONL of objects."""
    def rows(path) -> list[dict]:
        out = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ValueError(f"{path} line {number}: not JSON") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number}: not a JSON object")
                out.append(row)
        return out

    judged: dict = {}
    for row in rows(judge_votes):
        winner = row.get("winner")
        if winner in ("model_a", "model_b", "tie") and (row.get("counted", True) or row.get("question_id") not in judged):
            judged[row.get("question_id")] = winner
    pairs, seen = [], set()
    for row in rows(battles):
        battle, human = row.get("question_id"), row.get("winner")
        if battle in seen or battle not in judged or not isinstance(human, str) or \
                same_verdict(human) not in ("model_a", "model_b", "tie"):
            continue
        seen.add(battle)
        pairs.append((judged[battle], human))
    return pairs


def _pairs_from_store(log_dir: str, database: str | None) -> list[tuple[str, str]]:
    from .storage import Store, store_path
    if database is None and not store_path(log_dir).is_file():
        raise OSError(f"no store in {log_dir!r} (expected {store_path(log_dir)})")
    with Store(log_dir, read_only=True, database=database) as store:
        pairs = store.judge_human_pairs() if store.ok else []
        if not store.ok:
            raise OSError(f"cannot read the store: {store.problem}")
    return pairs


def format_stats(stats: dict) -> str:
    lines = []
    for key, label in (("with_ties", "with ties"), ("without_ties", "without ties")):
        row = stats[key]
        if not row["n"]:
            lines.append(f"{label}: no battles")
            continue
        kappa = "-" if row["kappa"] is None else f"{row['kappa']:.3f}"
        lines.append(f"{label}: {row['agree']} of {row['n']} agree ({100 * row['rate']:.1f}%), Cohen's kappa {kappa}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .backends import database_flag
    parser = argparse.ArgumentParser(prog="python -m vicuna_demo.data.agreement",
                                     description="How often the judge agrees with the visitors' votes, with Cohen's "
                                                 "kappa, with and without ties (FastChat's compute_agreement.py).")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--log-dir", default="logs", help="the demo's log directory (default: logs, the app's)")
    where.add_argument("--database", metavar="URI", help="a PostgreSQL store: postgresql://user@host/db (password "
                                                         "from PGPASSWORD); 'env' reads VICUNA_DEMO_DATABASE")
    where.add_argument("--battles", metavar="FILE", help="an export's battles (with --judge-votes FILE)")
    parser.add_argument("--judge-votes", metavar="FILE", help="an export's judge votes (with --battles FILE)")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    if bool(args.battles) != bool(args.judge_votes):
        parser.error("--battles FILE and --judge-votes FILE go together")
    database = database_flag(args.database, parser.error)
    try:
        if args.battles:
            pairs, source = pairs_from_files(args.battles, args.judge_votes), f"{args.battles} + {args.judge_votes}"
        else:
            pairs = _pairs_from_store(args.log_dir, database)
            source = "the PostgreSQL store" if database else str(Path(args.log_dir))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats = agreement_stats(pairs)
    if args.json:
        print(json.dumps({"source": source, **stats}))
    else:
        print(f"Judge versus visitors over the battles with both verdicts ({source}):")
        print(format_stats(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
