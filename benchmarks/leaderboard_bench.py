"""How long the leaderboard takes to refresh: 100k battles between 30 models, each way the page and the CLI
can compute it (raw / style-controlled, bootstrap / sandwich), from a store on disk and from memory.

    python benchmarks/leaderboard_bench.py [--battles 100000] [--models 30] \
        [--out benchmarks/results/DATE_cpu2_leaderboard_bench.json]

Issue 29's target: the page's board for 100k battles and 30 models refreshes in under 2 s on the 2-core CI
machine. The store part writes the battles once (votes with their style counts) into a temporary store
and times ``LeaderboardService.human`` (read + fit + figure), as the page's refresh does: the first
style-controlled refresh reads every vote's style counts; later ones read only the votes stored since.
Times are the best of three runs (one for the style bootstrap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vicuna_demo.data.ratings import fit_board  # noqa: E402
from vicuna_demo.data.simulate import simulate  # noqa: E402
from vicuna_demo.data.style import counts_from_metadata  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--battles", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    strengths = {f"model-{i:02d}": float(s) for i, s in enumerate(rng.normal(1000, 100, args.models))}
    lengths = {m: int(rng.integers(100, 600)) for m in strengths}
    rows = simulate(args.battles, strengths=strengths, lengths=lengths, tie_share=0.1, seed=1)
    battles = [(r["model_a"], r["model_b"], r["winner"]) for r in rows]
    styles = [counts_from_metadata(r["conv_metadata"]) for r in rows]
    results = {"battles": args.battles, "models": args.models, "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
               "seconds": {}}
    cases = {
        "raw, bootstrap 100": lambda: fit_board(battles),
        "raw, sandwich": lambda: fit_board(battles, ci="sandwich"),
        "raw reweighted, sandwich": lambda: fit_board(battles, ci="sandwich", reweight=True),
        "style, sandwich": lambda: fit_board(battles, style=styles, ci="sandwich"),
        "style, bootstrap 100": lambda: fit_board(battles, style=styles, ci="bootstrap"),
    }
    for name, case in cases.items():
        results["seconds"][name] = round(timed(case, 1 if "style, bootstrap" in name else 3), 3)
        print(f"{name:28s} {results['seconds'][name]:7.3f} s", flush=True)

    from types import SimpleNamespace

    from vicuna_demo.data.storage import Store
    from vicuna_demo.services.leaderboard import LeaderboardService

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        with store._lock:  # one transaction for the whole fill (the app writes one vote at a time)
            store._db.execute("BEGIN")
            for k, r in enumerate(rows):
                store._db.execute(
                    "INSERT INTO votes (battle_id, tstamp, client_hash, anony, model_a, model_b, winner, counted, "
                    "not_counted_reason, conversation_a_id, conversation_b_id, conv_metadata) "
                    "VALUES (?, ?, 'h', 1, ?, ?, ?, 1, NULL, ?, ?, ?)",
                    (f"b{k}", float(k), r["model_a"], r["model_b"], r["winner"], f"a{k}", f"b{k}",
                     json.dumps(r["conv_metadata"])))
            store._db.execute("COMMIT")
        service = SimpleNamespace(store=store, model_names=lambda: list(strengths))
        board = LeaderboardService(service, SimpleNamespace(min_battles=20, arena_weights="", identity_words=()))
        start = time.perf_counter()
        board.human(False, style_control=True)
        results["seconds"]["page refresh: style control, first (reads every vote)"] = round(
            time.perf_counter() - start, 3)
        print(f"{'page refresh: style, first':28s} {time.perf_counter() - start:7.3f} s", flush=True)
        for name, style in (("page refresh: raw", False), ("page refresh: style control", True)):
            results["seconds"][name] = round(timed(lambda: board.human(False, style_control=style)), 3)
            print(f"{name:28s} {results['seconds'][name]:7.3f} s", flush=True)
        store.close()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
