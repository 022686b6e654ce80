"""Votes that can be trusted on a public link, tried as a hostile visitor would against the running app
(gradio_client and gradio's raw HTTP routes; scripted engines): a new session per battle from one address
meets the daily cap of counted votes; a vote without the battle's session, or a replay of one, stores
nothing; the notice says whether the vote counted. The rules live in services/battle.py
(tests/test_battle.py drives them without gradio, two votes raced in one session included).

Run: .venv/bin/python -m pytest tests/test_vote_integrity.py -q
"""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from tests.engines import RecordingEngine

PARAMS = (0.7, 1.0, 32)


@pytest.fixture
def arena(launch_app):
    engines = {n: RecordingEngine(n, f"A short reply from side {i}.", 0.0) for i, n in enumerate(("Koala", "Alpaca"))}
    url, runtime = launch_app(["--rate-limit", "0", "--daily-vote-cap", "3"], engines=engines)
    return url, runtime.service.store


def battle_and_vote(url: str, vote: str = "a") -> str:
    client = Client(url, verbose=False)     # a new session for every battle, as the hostile visitor did
    client.predict("Which is the largest planet?", *PARAMS, api_name="/arena_send")
    return client.predict(vote, api_name="/arena_vote")[3]


def raw_call(url: str, api_name: str, data: list) -> list[tuple[str, str]]:
    base = url.rstrip("/")
    event_id = httpx.post(f"{base}/gradio_api/call/{api_name}", json={"data": data}, timeout=30).json()["event_id"]
    events, name = [], None
    with httpx.stream("GET", f"{base}/gradio_api/call/{api_name}/{event_id}", timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, line.split(":", 1)[1].strip()))
    return events


def test_one_address_with_a_new_session_per_battle_gets_the_daily_cap_of_counted_votes(arena):
    url, store = arena
    notices = [battle_and_vote(url) for _ in range(5)]
    rows = store.vote_rows()
    assert [r["counted"] for r in rows] == [True, True, True, False, False]
    assert {r["not_counted_reason"] for r in rows[3:]} == {"daily_cap"}
    assert all("Your vote counts in the leaderboard." in n for n in notices[:3])
    assert all("not counted in the leaderboard: you reached today's limit" in n for n in notices[3:])
    assert len(store.battles()) == 3


def test_a_vote_through_the_raw_route_without_the_battles_session_stores_nothing(arena):
    url, store = arena
    battle_and_vote(url)
    events = raw_call(url, "arena_vote", ["a"])
    assert events and events[-1][0] == "complete"
    assert "Votes open once both replies have finished." in events[-1][1]
    assert store.count_votes() == 1


def test_a_replayed_vote_in_the_same_session_stores_nothing(arena):
    url, store = arena
    client = Client(url, verbose=False)
    client.predict("Hello?", *PARAMS, api_name="/arena_send")
    client.predict("a", api_name="/arena_vote")
    for replay in ("a", "b", "tie"):
        assert client.predict(replay, api_name="/arena_vote")[3] == "You already voted on this battle."
    assert store.count_votes() == 1


def test_two_votes_raced_in_one_session_store_one(arena):
    url, store = arena
    client = Client(url, verbose=False)
    client.predict("Hello?", *PARAMS, api_name="/arena_send")
    jobs = [client.submit(choice, api_name="/arena_vote") for choice in ("a", "b", "tie", "bothbad")]
    notices = [job.result(timeout=60)[3] for job in jobs]
    assert sum("Thanks for voting" in n for n in notices) == 1
    assert store.count_votes() == 1
