"""Two app replicas (``python app.py ... --database URI``, as an operator starts them) sharing one real
PostgreSQL, their models a recording OpenAI-compatible server both reach. Visitors on both; every vote
acknowledged is stored once and both leaderboards agree; the rate limit holds across replicas; the
database restarted mid-run loses no acknowledged vote (each is stored or the visitor is told); a replica
killed mid-vote loses nothing it acknowledged. Visitors are told apart by X-Forwarded-For (the replicas
trust 127.0.0.1 as their proxy, as behind a load balancer)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client

from tests.chat_client import chat, stop_app
from tests.recording_model_server import RecordingModelServer
from vicuna_demo.data.storage import Store

REPO = Path(__file__).resolve().parents[1]
RATE = 4
ANON = (0.7, 1.0, 32)
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, name: str, uri: str, endpoints: list[str], folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        argv = [sys.executable, str(REPO / "app.py"), *sum((["--endpoint", e] for e in endpoints), []),
                "--port", str(self.port), "--moderation", "off", "--rate-limit", str(RATE),
                "--forwarded-allow-ips", "127.0.0.1", "--log-dir", str(folder / name), "--log-level", "WARNING"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "VICUNA_DEMO_DATABASE": uri}
        self.log = open(folder / f"{name}.log", "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replica exited: {Path(self.log.name).read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(self.url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"replica not ready: {Path(self.log.name).read_text()[-2000:]}")

    def client(self, visitor: str) -> Client:
        return Client(self.url, verbose=False, headers={"X-Forwarded-For": visitor}, httpx_kwargs={"timeout": 120})


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    uri = postgres.fresh_database()
    model = RecordingModelServer(reply="Paris is the capital of France.", delay_s=0.01).start()
    endpoints = [model.endpoint("RecA", "rec-a"), model.endpoint("RecB", "rec-b")]
    replicas = [Replica(f"replica-{i}", uri, endpoints, folder) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_ready()
        store = Store(None, database=uri)
        yield replicas, store, postgres
        store.close()
    finally:
        for replica in replicas:
            if replica.proc.poll() is None:
                stop_app(replica.proc)
            replica.log.close()
        model.stop()


def battle_and_vote(client: Client) -> str:
    """One anonymous round then a vote -> the vote's notice ('' if the round itself failed)."""
    client.submit("What is the capital of France?", *ANON, api_name="/arena_send").result(timeout=120)
    *_, notice, _ = client.predict("👈 A is better", api_name="/arena_vote")
    return notice or ""


def acknowledged(notice: str) -> bool:
    return "Thanks for voting" in notice


def test_visitors_on_two_replicas_every_acknowledged_vote_stored_once_and_both_leaderboards_agree(cluster):
    replicas, store, _ = cluster
    before = store.count_votes()
    visitors = [(replicas[i % 2], f"10.1.0.{i + 1}") for i in range(64)]  # 2 replicas x 32
    with ThreadPoolExecutor(max_workers=4) as pool:  # the pages open first (2 cores here), then all vote at once
        clients = list(pool.map(lambda item: item[0].client(item[1]), visitors))
    with ThreadPoolExecutor(max_workers=64) as pool:
        notices = list(pool.map(battle_and_vote, clients))
    acked = sum(acknowledged(n) for n in notices)
    assert acked == 64, [n for n in notices if not acknowledged(n)][:3]
    assert store.count_votes() - before == acked
    rows = store.vote_rows(first_per_battle=False)
    assert len(rows) == len({v["battle_id"] for v in rows}) == before + acked  # each vote once, one per battle
    boards = [r.client("10.9.9.9").predict(False, api_name="/leaderboard_refresh")[:2] for r in replicas]
    assert boards[0] == boards[1] and boards[0][1]  # both replicas rank the same battles


def test_the_rate_limit_holds_across_replicas(cluster):
    replicas, _, _ = cluster
    visitor = "10.2.0.1"
    results = [chat(replicas[i % 2].client(visitor), f"message {i}", "RecA") for i in range(RATE + 3)]
    refused = ["too fast" in r.notice for r in results]
    assert refused == [False] * RATE + [True] * 3


def test_the_database_restarted_mid_run_loses_no_acknowledged_vote(cluster):
    replicas, store, postgres = cluster
    before = store.count_votes()
    notices: list[str] = []
    lock = threading.Lock()

    def voter(i: int) -> None:
        replica = replicas[i % 2]
        for round_ in range(3):
            try:
                notice = battle_and_vote(replica.client(f"10.3.{i}.{round_ + 1}"))
            except Exception as exc:  # noqa: BLE001 - a round refused while the database is down is fine
                notice = f"error: {exc}"
            with lock:
                notices.append(notice)

    threads = [threading.Thread(target=voter, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    postgres.restart()
    for t in threads:
        t.join(timeout=180)
    acked = sum(acknowledged(n) for n in notices)
    assert acked > 0
    assert store.count_votes() - before == acked, notices  # every acknowledged vote is there, no more
    # and the replicas serve on, storing votes again
    assert all(acknowledged(battle_and_vote(r.client("10.3.99.1"))) for r in replicas)


def test_a_replica_killed_mid_vote_loses_nothing_it_acknowledged(cluster):
    replicas, store, _ = cluster
    before = store.count_votes()
    notices: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def voter(i: int) -> None:
        round_ = 0
        while not stop.is_set():
            round_ += 1
            try:
                notice = battle_and_vote(replicas[0].client(f"10.4.{i}.{round_}"))
            except Exception:  # noqa: BLE001 - the replica died under this visitor
                return
            with lock:
                notices.append(notice)

    threads = [threading.Thread(target=voter, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(acknowledged(n) for n in list(notices)) < 3:
        time.sleep(0.2)
    replicas[0].proc.send_signal(signal.SIGKILL)  # while the voters are mid-round or mid-vote
    stop.set()
    for t in threads:
        t.join(timeout=60)
    acked = sum(acknowledged(n) for n in notices)
    stored = store.count_votes() - before
    assert acked > 0
    assert acked <= stored <= acked + len(threads)  # at most the votes in flight were stored unacknowledged
    assert acknowledged(battle_and_vote(replicas[1].client("10.4.99.1")))  # the other replica serves on
