"""Generated arena battles with known strengths and a planted style effect (for tests, benchmarks and the
worked example in docs/arena.md).

Each battle draws two different models uniformly, an answer length per side (the model's typical length
times a log-normal factor, so lengths vary within a model), and the outcome from

    logit P(A wins) = ln(10) (R_A - R_B) / 400 + length_effect * x

where x is the battle's normalised length feature (style.py). ``length_effect`` 0 means length does not
sway the voters. Rows are FastChat clean-battle objects with ``conv_metadata`` (the counts as style.py
writes them), so ``python -m vicuna_demo.data.leaderboard --style-control`` reads them directly.

Run::

    python -m vicuna_demo.data.simulate --battles 5000 --seed 0 > battles.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping

import numpy as np

from .style import StyleCounts, conv_metadata, style_features

# the worked example: "verbose" is as strong as "m2" but answers three times as long
EXAMPLE_STRENGTHS = {"m0": 1100.0, "m1": 1050.0, "m2": 1000.0, "m3": 950.0, "verbose": 1000.0}
EXAMPLE_LENGTHS = {"m0": 200, "m1": 200, "m2": 200, "m3": 200, "verbose": 600}
EXAMPLE_LENGTH_EFFECT = 0.5


def simulate(n: int, *, strengths: Mapping[str, float] = EXAMPLE_STRENGTHS,
             lengths: Mapping[str, int] = EXAMPLE_LENGTHS, length_effect: float = EXAMPLE_LENGTH_EFFECT,
             tie_share: float = 0.0, seed: int = 0) -> list[dict]:
    """``n`` battles as clean-battle dicts (question_id, model_a, model_b, winner, anony, conv_metadata)."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    first = rng.integers(0, len(names), n)
    second = (first + rng.integers(1, len(names), n)) % len(names)
    typical = np.array([lengths.get(m, 200) for m in names], dtype=float)
    tokens_a = np.maximum(1, (typical[first] * rng.lognormal(0.0, 0.6, n)).astype(int))
    tokens_b = np.maximum(1, (typical[second] * rng.lognormal(0.0, 0.6, n)).astype(int))
    counts = [(StyleCounts(tokens=int(x)), StyleCounts(tokens=int(y))) for x, y in zip(tokens_a, tokens_b)]
    x = style_features(counts)[:, 0] if n else np.zeros(0)
    strength = np.array([strengths[m] for m in names])
    logit = math.log(10.0) * (strength[first] - strength[second]) / 400.0 + length_effect * x
    wins = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    ties = rng.random(n) < tie_share
    return [{"question_id": f"sim-{seed}-{k}", "model_a": names[i], "model_b": names[j],
             "winner": "tie" if ties[k] else ("model_a" if wins[k] else "model_b"), "anony": True,
             "tstamp": float(k), "conv_metadata": conv_metadata(*counts[k])}
            for k, (i, j) in enumerate(zip(first, second))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vicuna_demo.data.simulate",
                                     description="Write generated battles (clean-battle JSONL) to stdout.")
    parser.add_argument("--battles", type=int, default=5000, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length-effect", type=float, default=EXAMPLE_LENGTH_EFFECT, metavar="B",
                        help=f"log-odds per standard deviation of the length feature (default {EXAMPLE_LENGTH_EFFECT})")
    parser.add_argument("--tie-share", type=float, default=0.0, metavar="P")
    args = parser.parse_args(argv)
    if args.battles < 0 or not 0 <= args.tie_share <= 1:
        parser.error("--battles must be >= 0 and --tie-share in [0, 1]")
    for row in simulate(args.battles, length_effect=args.length_effect, tie_share=args.tie_share, seed=args.seed):
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
