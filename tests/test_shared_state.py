"""State that app replicas share through one PostgreSQL (vicuna_demo/data/shared.py): the per-visitor rate
limit and the "one evaluation at a time" slot hold across replicas, under concurrent requests, and a slot
whose replica died frees itself. Each "replica" here is its own Store on the same real database."""

from __future__ import annotations

import threading
import time

import pytest

from vicuna_demo.data.shared import SharedRateLimiter, SharedSlot
from vicuna_demo.data.storage import Store
from vicuna_demo.services.chat import RateLimiter, rate_limiter_for


@pytest.fixture
def replicas(postgres_uri, tmp_path):
    stores = [Store(tmp_path / f"replica-{i}", database=postgres_uri) for i in range(2)]
    yield stores
    for store in stores:
        store.close()


def test_the_rate_limit_holds_across_replicas_and_per_visitor(replicas):
    one, two = (SharedRateLimiter(store, "chat", 3) for store in replicas)
    assert [one.allow("visitor"), two.allow("visitor"), one.allow("visitor")] == [0.0, 0.0, 0.0]
    assert 0 < two.allow("visitor") <= 60 and 0 < one.allow("visitor") <= 60
    assert two.allow("someone-else") == 0.0
    assert SharedRateLimiter(replicas[0], "judge", 3).allow("visitor") == 0.0  # each limit counts on its own


def test_concurrent_requests_on_two_replicas_get_exactly_the_limit(replicas):
    limiters = [SharedRateLimiter(store, "chat", 5) for store in replicas]
    results: list[float] = []
    lock = threading.Lock()

    def ask(limiter):
        wait = limiter.allow("burst")
        with lock:
            results.append(wait)

    threads = [threading.Thread(target=ask, args=(limiters[i % 2],)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for w in results if w == 0.0) == 5 and len(results) == 24


def test_an_expired_minute_frees_the_visitor_again(replicas):
    now = [1000.0]
    limiter = SharedRateLimiter(replicas[0], "chat", 1, clock=lambda: now[0])
    assert limiter.allow("v") == 0.0 and limiter.allow("v") == pytest.approx(60.0)
    now[0] += 60.0
    assert SharedRateLimiter(replicas[1], "chat", 1, clock=lambda: now[0]).allow("v") == 0.0


def test_one_evaluation_at_a_time_across_replicas(replicas):
    one, two = (SharedSlot(store, "evaluation") for store in replicas)
    assert one.acquire(blocking=False)
    assert not two.acquire(blocking=False) and not one.acquire(blocking=False)
    assert one.locked() and two.locked()
    one.release()
    assert not two.locked()
    assert two.acquire(blocking=False)
    two.release()


def test_a_slot_held_by_a_dead_replica_frees_itself_when_its_lease_runs_out(replicas):
    dead = SharedSlot(replicas[0], "evaluation", lease_s=0.5, renew_s=3600)  # never renews: as if killed
    alive = SharedSlot(replicas[1], "evaluation")
    assert dead.acquire(blocking=False)
    assert not alive.acquire(blocking=False)
    time.sleep(0.7)
    assert alive.acquire(blocking=False)
    alive.release()


def test_services_share_the_limit_only_when_the_store_is_shared(replicas, tmp_path):
    assert isinstance(rate_limiter_for(replicas[0], "chat", 30), SharedRateLimiter)
    with Store(tmp_path / "sqlite") as local:
        assert isinstance(rate_limiter_for(local, "chat", 30), RateLimiter)


def test_an_unreachable_database_lets_chat_through_but_refuses_the_slot(tmp_path):
    store = Store(tmp_path, database="postgresql://nobody@127.0.0.1:1/none")
    assert SharedRateLimiter(store, "chat", 1).allow("v") == 0.0
    assert not SharedSlot(store, "evaluation").acquire(blocking=False)
    store.close()


def test_a_turn_a_down_database_cannot_take_is_reported_to_the_visitor(tmp_path, monkeypatch):
    from tests.engines import RecordingEngine, WordModerator
    from vicuna_demo.data import storage
    from vicuna_demo.services.chat import NOT_SAVED_NOTICE, ChatService, Limits
    from vicuna_demo.services.session import ChatSession

    monkeypatch.setattr(storage, "WRITE_RETRY_S", 0.5)  # retried, then reported (15 s in the app)
    store = Store(tmp_path, database="postgresql://nobody@127.0.0.1:1/none")
    service = ChatService({"M": RecordingEngine("M", "Hello.", delay_s=0.0)}, WordModerator(), store,
                          limits=Limits(rate_limit_per_min=0))
    *_, last = list(service.turn(ChatSession(), "Hi", model="M", client="v"))
    assert last.done and last.status == "done" and NOT_SAVED_NOTICE in last.notice
    store.close()
