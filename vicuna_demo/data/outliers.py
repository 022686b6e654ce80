"""The outlier-voter check: visitors whose votes the ratings find far less likely than chance allows.

For each visitor identity (the salted client hash) with at least ``min_votes`` decisive counted votes, the
check sums, over those votes, the log-probability the fitted ratings give the chosen winner, and compares
it with what an honest voter who votes as the ratings predict would score: each vote's expected
log-probability is p log p + (1 - p) log(1 - p) and its variance p (1 - p) (log(p / (1 - p)))^2. A
visitor whose total falls more than ``z`` standard deviations below that expectation (default 3: about
one honest visitor in 700 is flagged) is an outlier, and their votes are flagged as not counted
(``outlier_voter``) in the store's append-only ``vote_flags``: kept, with the reason. Ties carry no
direction and are left out of the test. The ratings come from all counted votes, the suspect's
included, which makes the check conservative.

Run::

    python -m vicuna_demo.data.outliers --log-dir logs [--min-votes 10] [--z 3] [--apply]

It prints each outlier (hash prefix, votes, z) and, with ``--apply``, flags their votes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

from .ratings import compute_leaderboard

REASON = "outlier_voter"
MIN_VOTES = 10
Z = 3.0
_LN10 = math.log(10.0)


def outlier_voters(votes: list[dict], ratings: dict[str, float], *, min_votes: int = MIN_VOTES,
                   z: float = Z) -> dict[str, float]:
    """client_hash -> z-score for each visitor whose decisive votes are too unlikely under ``ratings``."""
    per_client: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for vote in votes:
        if vote["winner"] not in ("model_a", "model_b") or vote["model_a"] not in ratings \
                or vote["model_b"] not in ratings:
            continue
        p = 1.0 / (1.0 + math.exp(-_LN10 * (ratings[vote["model_a"]] - ratings[vote["model_b"]]) / 400.0))
        p = min(max(p, 1e-9), 1 - 1e-9)
        chosen = p if vote["winner"] == "model_a" else 1.0 - p
        expected = p * math.log(p) + (1 - p) * math.log(1 - p)
        variance = p * (1 - p) * math.log(p / (1 - p)) ** 2
        per_client[vote["client_hash"]].append((math.log(chosen), expected, variance))
    outliers = {}
    for client, scores in per_client.items():
        if len(scores) < min_votes:
            continue
        variance = sum(v for _, _, v in scores)
        if variance <= 0:
            continue
        score = (sum(s for s, _, _ in scores) - sum(e for _, e, _ in scores)) / math.sqrt(variance)
        if score < -z:
            outliers[client] = score
    return outliers


def check(store, *, min_votes: int = MIN_VOTES, z: float = Z, apply: bool = False) -> dict[str, tuple[int, float]]:
    """Run the check on a store's counted anonymous votes -> client_hash -> (votes, z); with ``apply``,
    flag the outliers' votes."""
    votes = store.counted_choices(anony_only=True)
    ratings = {r.model: r.rating for r in compute_leaderboard(
        [(v["model_a"], v["model_b"], v["winner"]) for v in votes], bootstrap_rounds=0)}
    found = outlier_voters(votes, ratings, min_votes=min_votes, z=z)
    result = {}
    for client, score in found.items():
        theirs = [v["battle_id"] for v in votes if v["client_hash"] == client]
        result[client] = (len(theirs), score)
        if apply:
            store.flag_votes(theirs, REASON)
    return result


def main(argv: list[str] | None = None) -> int:
    from .storage import Store, store_path

    parser = argparse.ArgumentParser(prog="python -m vicuna_demo.data.outliers",
                                     description="Find (and with --apply, flag) voters whose votes the ratings "
                                                 "find far less likely than chance allows.")
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--min-votes", type=int, default=MIN_VOTES, metavar="N")
    parser.add_argument("--z", type=float, default=Z, help=f"standard deviations below expectation (default {Z:g})")
    parser.add_argument("--apply", action="store_true", help="flag the outliers' votes as not counted")
    args = parser.parse_args(argv)
    if not store_path(args.log_dir).is_file():
        print(f"error: no store in {args.log_dir!r}", file=sys.stderr)
        return 1
    with Store(args.log_dir) as store:
        found = check(store, min_votes=args.min_votes, z=args.z, apply=args.apply)
    for client, (n, score) in sorted(found.items(), key=lambda item: item[1][1]):
        print(f"{client[:12]}  {n} votes  z = {score:.1f}")
    print(f"{len(found)} outlier voter{'' if len(found) == 1 else 's'}" + (" flagged" if args.apply and found else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
