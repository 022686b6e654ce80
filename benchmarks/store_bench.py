"""The store's speed on SQLite and PostgreSQL on the same machine (issue 30): vote and turn writes with many
concurrent writers (p50 / p95 latency of one ``log_vote`` / ``log_turn`` call, and rows per second), and
the leaderboard read (``Store.battles()`` + ``compute_leaderboard``) over a large store.

PostgreSQL is the ``pgserver`` wheel's (16.2, default settings, Unix socket) started in a temp folder,
so both back ends share the machine's disk and cores. Writers are threads of one process, as gradio's
workers are. Each result is one JSON line (``--out``), with the device named by ``--device``.

    python benchmarks/store_bench.py --writers 64 --writes 20 --battles 100000 --models 30 \\
        --device "CPU, 2 cores" --out benchmarks/results/2026-12-07_cpu_store_bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vicuna_demo.data.queries import VOTES  # noqa: E402
from vicuna_demo.data.ratings import compute_leaderboard  # noqa: E402
from vicuna_demo.data.storage import Store, TurnRecord, VoteRecord  # noqa: E402

REPLY = "Paris is the capital of France. " * 20  # ~640 characters, a typical short reply


def turn(i: int) -> TurnRecord:
    return TurnRecord(conversation_id=f"c{i}", turn_index=0, tstamp=time.time(), client_hash="h" * 64, model="m",
                      template="vicuna_v1.1", params={"temperature": 0.7}, reply=REPLY,
                      messages=[{"role": "user", "content": "What is the capital of France?"}], finish_reason="stop",
                      n_tokens=128, ttft_s=0.1, tok_s=40.0, moderation="passed", moderation_categories=())


def vote(i: int, models: list[str], rng: random.Random) -> VoteRecord:
    a, b = rng.sample(models, 2)
    return VoteRecord(battle_id=f"b{i}", tstamp=time.time(), client_hash="h" * 64, anony=True, model_a=a, model_b=b,
                      winner=rng.choice(("model_a", "model_b", "tie", "tie (bothbad)")), counted=True,
                      not_counted_reason=None, conversation_a_id=f"b{i}-a", conversation_b_id=f"b{i}-b")


def concurrent_writes(store: Store, kind: str, writers: int, writes: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    rng = random.Random(0)
    models = [f"model-{k}" for k in range(30)]
    start = threading.Barrier(writers)

    def writer(w: int) -> None:
        mine = []
        start.wait()
        for j in range(writes):
            i = w * writes + j + int(time.time() * 1000) % 1_000_000 * 10_000
            t0 = time.perf_counter()
            ok = store.log_vote(vote(i, models, rng)) if kind == "vote" else store.log_turn(turn(i))
            mine.append(time.perf_counter() - t0)
            assert ok, store.problem
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"what": f"{kind} writes", "writers": writers, "rows": len(latencies),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 2),
            "rows_per_s": round(len(latencies) / wall, 1)}


def fill_battles(store: Store, battles: int, models: int) -> None:
    rng = random.Random(1)
    names = [f"model-{k}" for k in range(models)]
    rows = []
    for i in range(battles):
        a, b = rng.sample(names, 2)
        rows.append({"battle_id": f"lb{i}", "tstamp": 1.7e9 + i, "client_hash": "h" * 64, "anony": 1, "model_a": a,
                     "model_b": b, "winner": rng.choice(("model_a", "model_b", "tie")), "counted": 1,
                     "not_counted_reason": None, "conversation_a_id": f"lb{i}-a", "conversation_b_id": f"lb{i}-b"})
    for k in range(0, len(rows), 10_000):
        with store.transaction() as conn:
            conn.execute(sa.insert(VOTES), rows[k:k + 10_000])


def leaderboard_read(store: Store, repeats: int = 3) -> dict:
    reads, fits = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        battles = store.battles()
        t1 = time.perf_counter()
        compute_leaderboard(battles)
        reads.append(t1 - t0)
        fits.append(time.perf_counter() - t1)
    return {"what": "leaderboard", "battles": len(battles), "read_s_median": round(statistics.median(reads), 3),
            "ratings_s_median": round(statistics.median(fits), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--writes", type=int, default=20, help="writes per writer per kind")
    parser.add_argument("--battles", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=30)
    parser.add_argument("--device", default="CPU, 2 cores")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import pgserver

    results = []
    with tempfile.TemporaryDirectory(prefix="store-bench-") as folder:
        server = pgserver.get_server(Path(folder) / "pgdata", cleanup_mode="stop")
        try:
            for backend in ("sqlite", "postgresql"):
                uri = server.get_uri() if backend == "postgresql" else None
                for kind in ("vote", "turn"):
                    with Store(Path(folder) / f"{backend}-{kind}", database=uri) as store:
                        results.append({"backend": backend, **concurrent_writes(store, kind, args.writers,
                                                                                   args.writes)})
                        print(json.dumps(results[-1]), flush=True)
            # the leaderboard, on fresh stores holding only the generated battles
            engine = sa.create_engine(server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1),
                                      isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql("CREATE DATABASE leaderboard")
            engine.dispose()
            head, _, query = server.get_uri().partition("?")
            for backend, uri in (("sqlite", None), ("postgresql", f"{head.rsplit('/', 1)[0]}/leaderboard?{query}")):
                with Store(Path(folder) / f"{backend}-leaderboard", database=uri) as store:
                    fill_battles(store, args.battles, args.models)
                    results.append({"backend": backend, "models": args.models, **leaderboard_read(store)})
                    print(json.dumps(results[-1]), flush=True)
        finally:
            server.cleanup()
    stamp = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "python": sys.version.split()[0],
             "sqlalchemy": sa.__version__, "postgresql": "16.2 (pgserver wheel)"}
    if args.out:
        with args.out.open("w") as f:
            for row in results:
                f.write(json.dumps({**stamp, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
