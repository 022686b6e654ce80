"""Behaviour tests for vicuna_demo.data.storage (the turn/vote log: round trips, migrations, privacy,
failure handling, crash safety). Tests taking ``backend`` run on SQLite and on a real PostgreSQL
(tests/postgres.py); the rest are about the SQLite file itself.

Run: .venv-test/bin/python -m pytest tests/test_storage.py -q
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from vicuna_demo.data import storage
from vicuna_demo.data.storage import (
    MIGRATIONS,
    SCHEMA_VERSION,
    JudgeVoteRecord,
    LabelRecord,
    NullStore,
    Store,
    TurnRecord,
    VoteRecord,
    open_store,
)

REPO = Path(__file__).resolve().parents[1]


def make_turn(conversation_id="conv-1", turn_index=0, user="Hello", reply="Hi there!", **overrides) -> TurnRecord:
    fields = dict(
        conversation_id=conversation_id,
        turn_index=turn_index,
        tstamp=1_700_000_000.25 + turn_index,
        client_hash="c" * 64,
        model="vicuna-7b",
        template="vicuna_v1.1",
        params={"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 512},
        messages=[{"role": "system", "content": "Be nice."}, {"role": "user", "content": user}],
        reply=reply,
        finish_reason="stop",
        n_tokens=4,
        ttft_s=0.12,
        tok_s=15.5,
        moderation="passed",
        moderation_categories=(),
    )
    fields.update(overrides)
    return TurnRecord(**fields)


def make_judge_vote(battle_id="battle-1", winner="model_b") -> JudgeVoteRecord:
    return JudgeVoteRecord(battle_id=battle_id, tstamp=1_700_000_200.0, client_hash="e" * 64, judge="judge-model",
                           prompt="pair-v1", model_a="vicuna-7b", model_b="smollm2", winner=winner,
                           g1_winner=winner, g2_winner=winner, g1_judgment="[[B]]", g2_judgment="[[A]]", error=None,
                           n_turns=1, conversation_a_id=f"{battle_id}-a", conversation_b_id=f"{battle_id}-b")


def make_vote(battle_id="battle-1", winner="model_a", **overrides) -> VoteRecord:
    fields = dict(
        battle_id=battle_id,
        tstamp=1_700_000_100.5,
        client_hash="d" * 64,
        anony=True,
        model_a="vicuna-7b",
        model_b="smollm2",
        winner=winner,
        counted=True,
        not_counted_reason=None,
        conversation_a_id=f"{battle_id}-a",
        conversation_b_id=f"{battle_id}-b",
    )
    fields.update(overrides)
    return VoteRecord(**fields)


class Backend:
    """One place for a store on one back end: ``open()`` gives a Store there (the same place every call),
    ``sql(text)`` runs raw SQL on it outside the store (as an operator, or an attacker, would)."""

    def __init__(self, name: str, tmp_path: Path, uri: str | None):
        self.name, self.tmp_path, self.uri = name, tmp_path, uri

    def open(self, **kwargs) -> Store:
        return Store(self.tmp_path, database=self.uri, **kwargs)

    def sql(self, text: str):
        url = self.uri.replace("postgresql://", "postgresql+psycopg://", 1) if self.uri else \
            f"sqlite:///{self.tmp_path / 'vicuna_demo.sqlite3'}"
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                result = conn.exec_driver_sql(text)
                return result.fetchall() if result.returns_rows else None
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> Backend:
    uri = request.getfixturevalue("postgres_uri") if request.param == "postgresql" else None
    return Backend(request.param, tmp_path, uri)


def test_a_store_written_by_the_sqlite_only_code_opens_and_keeps_working(tmp_path):
    # tests/data/store_main_8db2ad4.sqlite3: written by main at 8db2ad4 (raw sqlite3, schema version 5)
    (tmp_path / "vicuna_demo.sqlite3").write_bytes((REPO / "tests/data/store_main_8db2ad4.sqlite3").read_bytes())
    with Store(tmp_path, salt=b"main-salt") as store:
        assert store.ok
        assert store.count_turns() == 7 and store.count_votes() == 2
        assert store.battles() == [("vicuna-7b", "smollm2", "model_a")]
        assert store.judge_battles() == [("vicuna-7b", "smollm2", "model_b")]
        assert [t.reply for t in store.turns("solo")] == ["régénéré ✓"]
        assert store.log_vote(make_vote("battle-3", "model_b")) and store.log_turn(make_turn("new"))
        assert store.battles() == [("vicuna-7b", "smollm2", "model_a"), ("vicuna-7b", "smollm2", "model_b")]
    db = sqlite3.connect(tmp_path / "vicuna_demo.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM votes")
    db.close()


def storage_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vicuna_demo.data.storage" and r.levelno >= logging.WARNING]


def integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def test_turns_round_trip(backend):
    turn = make_turn(
        moderation="flagged",
        moderation_categories=("harassment", "violence"),
        finish_reason="moderated",
        error="boom",
        battle_id="battle-1",
        side="b",
        ttft_s=None,
        tok_s=None,
        messages=[{"role": "user", "content": "héllo ✓"}],
    )
    with backend.open() as store:
        assert store.log_turn(turn) is True
        assert store.log_turn(make_turn(turn_index=1)) is True
        assert store.turns() == [turn, make_turn(turn_index=1)]
        assert store.count_turns() == 2


def test_votes_round_trip_and_battles_for_ratings(backend):
    votes = [
        make_vote("b1", "model_a"),
        make_vote("b2", "tie (bothbad)", model_a="x", model_b="y"),
        make_vote("b3", "model_b", anony=False),
        make_vote("b4", "tie", counted=False, not_counted_reason="identity_leak"),
    ]
    with backend.open() as store:
        assert all(store.log_vote(v) for v in votes)
        assert store.count_votes() == 4
        assert store.vote_rows() == [vars(v) for v in votes]
        assert store.battles() == [("vicuna-7b", "smollm2", "model_a"), ("x", "y", "tie (bothbad)")]
        assert store.battles(anony_only=False, counted_only=False) == [
            (v.model_a, v.model_b, v.winner) for v in votes
        ]


def test_only_the_first_vote_of_a_battle_counts(backend):
    with backend.open() as store:
        store.log_vote(make_vote("b1", "model_a"))
        store.log_vote(make_vote("b1", "model_b"))
        assert store.battles() == [("vicuna-7b", "smollm2", "model_a")]
        assert store.count_votes() == 2
        assert len(store.vote_rows(first_per_battle=False)) == 2


def test_unknown_winner_is_a_caller_bug(backend):
    with backend.open() as store, pytest.raises(ValueError, match="winner"):
        store.log_vote(make_vote(winner="left"))


def test_rows_are_append_only(backend):
    with backend.open() as store:
        store.log_turn(make_turn())
        store.log_vote(make_vote())
        store.log_judge_vote(make_judge_vote())
    for attack in ("UPDATE turns SET reply = 'edited'", "DELETE FROM votes", "UPDATE judge_votes SET winner = 'tie'",
                   "DELETE FROM judge_votes"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):
            backend.sql(attack)
    if backend.name == "postgresql":
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):
            backend.sql("TRUNCATE votes")
    assert backend.sql("SELECT reply FROM turns") == [("Hi there!",)]
    assert backend.sql("SELECT COUNT(*) FROM votes") == [(1,)]


def test_labels_given_after_the_vote_are_kept_append_only_and_join_the_rules_labels(backend, monkeypatch):
    with backend.open() as store:
        assert store.log_vote(make_vote("b1", categories=["code", "lang:en"]))
        assert store.log_vote(make_vote("b2", categories=[]))
        _, _, labels, last = store.style_battles()
        assert labels == [["code", "lang:en"], []]
        answer = {"math": True}
        assert store.log_labels(LabelRecord("b1", 1.0, "judge:J", ["math", "hard_prompt"], answer))
        assert store.log_labels(LabelRecord("b2", 2.0, "judge:J", []))
        assert store.log_labels(LabelRecord("b1", 3.0, "judge:K", ["math", "creative_writing"]))
        assert store.later_labels() == ({"b1": ["math", "hard_prompt", "creative_writing"], "b2": []}, 3)
        assert store.later_labels(after_id=1, battle_ids={"b2"}) == ({"b2": []}, 2)
        assert store.style_battles()[2] == [["code", "lang:en", "math", "hard_prompt", "creative_writing"], []]
        assert store.label_rows()[0] == {"battle_id": "b1", "tstamp": 1.0, "labeller": "judge:J",
                                         "labels": ["math", "hard_prompt"], "answer": answer}
        assert store.log_vote(make_vote("b3", categories=["lang:fr"]))
        assert store.log_labels(LabelRecord("b3", 4.0, "judge:J", ["math"]))
        assert store.style_battles(after_id=last)[2] == [["lang:fr", "math"]]   # only the new vote, its labels joined
        from vicuna_demo.data import queries
        monkeypatch.setattr(queries, "MAX_IN_LIST", 0)                          # many new votes: every label row read
        assert store.style_battles(after_id=last)[2] == [["lang:fr", "math"]]
    for attack in ("UPDATE battle_labels SET labels = '[]'", "DELETE FROM battle_labels"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):
            backend.sql(attack)
    assert backend.sql("SELECT COUNT(*) FROM battle_labels") == [(4,)]


def test_new_store_is_migrated_from_an_empty_file_in_wal_mode(tmp_path):
    (tmp_path / "vicuna_demo.sqlite3").touch()
    with Store(tmp_path) as store:
        assert store.ok
        assert store.log_turn(make_turn())
    db = sqlite3.connect(tmp_path / "vicuna_demo.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"turns", "votes"} <= tables
    db.close()


def test_reopen_is_idempotent_and_keeps_data(backend):
    with backend.open() as store:
        store.log_turn(make_turn())
        store.log_vote(make_vote())
    with backend.open() as store:
        assert store.ok
        assert store.count_turns() == 1 and store.count_votes() == 1
        store.log_turn(make_turn(turn_index=1))
    with backend.open() as store:
        assert store.count_turns() == 2
    version = "PRAGMA user_version" if backend.name == "sqlite" else "SELECT version FROM schema_version"
    assert backend.sql(version) == [(SCHEMA_VERSION,)]


def test_an_older_store_gets_only_the_missing_migrations(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'vicuna_demo.sqlite3'}")
    with engine.begin() as db:
        MIGRATIONS[0](db)
        db.exec_driver_sql("PRAGMA user_version = 1")
        db.exec_driver_sql(
            "INSERT INTO turns (conversation_id, turn_index, tstamp, client_hash, model, template, params, "
            "messages, reply, finish_reason, n_tokens, moderation, moderation_categories) "
            "VALUES ('old', 0, 1.0, 'h', 'm', 't', '{}', '[]', 'r', 'stop', 1, 'off', '[]')"
        )
    engine.dispose()
    with Store(tmp_path) as store:
        assert store.ok
        assert [t.conversation_id for t in store.turns()] == ["old"]
        assert store.log_vote(make_vote())
    db = sqlite3.connect(tmp_path / "vicuna_demo.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_client_hash_is_salted_stable_and_never_the_ip(tmp_path):
    ip = "203.0.113.7"
    first = Store(tmp_path)
    hashed = first.client_hash(ip)
    first.close()
    assert ip not in hashed and len(hashed) == 64
    assert hashed == Store(tmp_path).client_hash(ip)  # same salt file -> same hash
    assert hashed != Store(tmp_path / "other").client_hash(ip)  # another salt -> another hash
    assert Store(tmp_path, salt=b"fixed").client_hash(ip) == Store(tmp_path / "x", salt=b"fixed").client_hash(ip)
    assert first.client_hash("203.0.113.8") != hashed
    salt_file = tmp_path / "salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    assert len(salt_file.read_bytes()) == 32


def test_unusable_log_dir_warns_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a directory should be")
    caplog.set_level(logging.DEBUG, logger="vicuna_demo.data.storage")
    store = Store(blocker / "sub")  # mkdir fails even for root: the parent is a file
    assert store.log_turn(make_turn()) is False
    assert store.log_vote(make_vote()) is False
    assert store.battles() == [] and store.conversations() == [] and store.count_turns() == 0
    assert len(store.client_hash("1.2.3.4")) == 64
    warnings = storage_warnings(caplog)
    assert len(warnings) == 1
    assert str(blocker / "sub") in warnings[0].getMessage()
    assert not store.ok and store.problem


def test_a_file_that_is_not_a_database_warns_once_and_is_left_alone(tmp_path, caplog):
    junk = b"this is not an SQLite database" * 100
    (tmp_path / "vicuna_demo.sqlite3").write_bytes(junk)
    store = Store(tmp_path)
    assert store.log_turn(make_turn()) is False
    assert store.log_vote(make_vote()) is False
    assert len(storage_warnings(caplog)) == 1
    assert (tmp_path / "vicuna_demo.sqlite3").read_bytes() == junk


def test_full_disk_warns_once_keeps_stored_rows_and_recovers(tmp_path, caplog, monkeypatch):
    with Store(tmp_path) as store:
        for i in range(3):
            store.log_turn(make_turn(turn_index=i))
    original_connect = Store._connect

    def connect_to_a_full_disk(self):
        db = original_connect(self)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # any growth now fails with SQLITE_FULL
        return db

    monkeypatch.setattr(Store, "_connect", connect_to_a_full_disk)
    store = Store(tmp_path)
    big = "x" * 200_000
    assert store.log_turn(make_turn(turn_index=3, reply=big)) is False
    assert store.log_turn(make_turn(turn_index=4, reply=big)) is False
    assert store.log_vote(make_vote()) in (True, False)  # a small row may still fit in free space
    warnings = storage_warnings(caplog)
    assert len(warnings) == 1 and "full" in warnings[0].getMessage()
    assert [t.turn_index for t in store.turns()] == [0, 1, 2]
    store.close()
    monkeypatch.undo()
    assert integrity(tmp_path / "vicuna_demo.sqlite3") == "ok"
    with Store(tmp_path) as healed:
        assert healed.log_turn(make_turn(turn_index=3, reply=big)) is True


def test_concurrent_threads_all_get_logged(backend):
    store = backend.open()

    def worker(n: int) -> None:
        for i in range(50):
            assert store.log_turn(make_turn(conversation_id=f"t{n}", turn_index=i))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count_turns() == 400
    store.close()


WRITER = textwrap.dedent(
    """
    import sys, time
    from vicuna_demo.data.storage import Store, TurnRecord
    store = Store(sys.argv[1])
    i = 0
    while True:
        store.log_turn(TurnRecord(
            conversation_id=f"c{i % 7}", turn_index=i, tstamp=time.time(), client_hash="h",
            model="m", template="t", params={}, messages=[{"role": "user", "content": "q" * 3000}],
            reply="r" * (1000 + 37 * (i % 100)), finish_reason="stop", n_tokens=i, ttft_s=None,
            tok_s=None, moderation="off", moderation_categories=()))
        i += 1
    """
)


def test_process_killed_mid_write_leaves_a_store_that_opens_intact(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + 20
            target = 100 * (round_ + 1)
            while time.monotonic() < deadline:
                with Store(tmp_path, read_only=True) as reader:
                    if reader.count_turns() >= target:
                        break
                time.sleep(0.05)
            else:
                pytest.fail("the writer subprocess did not write in time")
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
        assert writer.returncode == -signal.SIGKILL
        assert integrity(tmp_path / "vicuna_demo.sqlite3") == "ok"
        with Store(tmp_path) as store:
            assert store.ok
            count = store.count_turns()
            assert count >= target
            assert len(store.turns()) == count  # every stored row decodes
            assert store.log_turn(make_turn(conversation_id=f"after-kill-{round_}"))


def test_conversations_give_latest_state_with_regenerations_and_fitted_context(backend):
    system = {"role": "system", "content": "Be nice."}
    with backend.open() as store:
        store.log_turn(make_turn("c1", 0, user="Q1", reply="first draft"))
        store.log_turn(make_turn("c1", 0, user="Q1", reply="A1"))  # regenerated
        store.log_turn(make_turn("c2", 0, user="other", reply="x", model="smollm2"))
        store.log_turn(make_turn(
            "c1", 1, reply="", finish_reason="moderated", moderation="flagged", moderation_categories=("hate",),
            # context fitting dropped the first exchange; content arrives as gradio text blocks
            messages=[system, {"role": "user", "content": [{"type": "text", "text": "Q2"}]}],
        ))
        conversations = {c["conversation_id"]: c for c in store.conversations()}
    assert list(conversations) == ["c1", "c2"]
    c1 = conversations["c1"]
    assert c1["n_turns"] == 2 and c1["system"] == "Be nice." and c1["model"] == "vicuna-7b"
    assert [(t["user"], t["reply"], t["moderated"]) for t in c1["turns"]] == [("Q1", "A1", False), ("Q2", "", True)]
    assert c1["turns"][1]["moderation_categories"] == ["hate"]
    assert c1["messages"][-1] == {"role": "assistant", "content": ""}
    assert c1["messages"][0] == system


def test_read_only_store_reads_and_refuses_writes(backend):
    with backend.open() as store:
        store.log_vote(make_vote())
    reader = backend.open(read_only=True)
    assert reader.ok and reader.count_votes() == 1
    assert reader.log_vote(make_vote("b2")) is False
    assert reader.count_votes() == 1
    if backend.name == "sqlite":
        tmp_path = backend.tmp_path
        assert not Store(tmp_path / "nothing-here", read_only=True).ok
        assert not (tmp_path / "nothing-here").exists()


def test_replicas_sharing_a_postgresql_store_hash_visitors_alike_and_see_each_others_rows(postgres_uri, tmp_path):
    one, two = Store(tmp_path / "one", database=postgres_uri), Store(tmp_path / "two", database=postgres_uri)
    assert one.client_hash("203.0.113.7") == two.client_hash("203.0.113.7")
    assert not (tmp_path / "one").exists()  # nothing is written beside a shared store
    assert one.log_vote(make_vote("b1")) and two.log_vote(make_vote("b1", "model_b"))  # a replayed vote
    assert one.battles() == two.battles() == [("vicuna-7b", "smollm2", "model_a")]
    one.close(), two.close()


def test_a_bad_database_uri_is_reported_without_its_password(tmp_path, caplog):
    store = Store(tmp_path, database="postgresql://visitor:s3cret-pw@127.0.0.1:1/nowhere")
    assert not store.ok and "s3cret-pw" not in store.problem and "***" in store.where
    assert all("s3cret-pw" not in r.getMessage() for r in caplog.records)
    assert len(storage_warnings(caplog)) == 1


def test_null_store_keeps_nothing(tmp_path):
    store = open_store("")
    assert isinstance(store, NullStore)
    assert store.log_turn(make_turn()) is False and store.log_vote(make_vote()) is False
    assert store.battles() == [] and store.vote_rows() == [] and store.conversations() == []
    assert store.count_turns() == 0 and store.count_votes() == 0
    assert "1.2.3.4" not in store.client_hash("1.2.3.4")
    store.close()
    assert isinstance(open_store(tmp_path), Store)
    assert list(tmp_path.iterdir()) != []


def test_store_has_no_module_level_connection():
    assert not any(isinstance(v, sqlite3.Connection) for v in vars(storage).values())


def test_style_counts_are_stored_with_the_vote_and_counted_from_replies_for_older_votes(tmp_path):
    from vicuna_demo.data.style import count_style, conv_metadata

    a, b = count_style("# Plan\n- one\n- two", tokens=40), count_style("ok", tokens=2)
    with Store(tmp_path) as store:
        assert store.log_vote(make_vote("new", conv_metadata=conv_metadata(a, b)))
        assert store.vote_rows()[0]["conv_metadata"] == conv_metadata(a, b)
        # a vote stored before migration 6 has no counts: they come from its conversations' latest replies
        store.log_turn(make_turn(conversation_id="old-a", reply="first", n_tokens=1))
        store.log_turn(make_turn(conversation_id="old-a", reply="**bold** answer", n_tokens=9))  # regenerated
        store.log_turn(make_turn(conversation_id="old-b", reply="- item", n_tokens=3))
        assert store.log_vote(make_vote("old", conversation_a_id="old-a", conversation_b_id="old-b"))
        battles, styles, labels, last = store.style_battles()
        assert labels == [[], []]
        assert battles == [("vicuna-7b", "smollm2", "model_a")] * 2
        assert styles[0] == (a.vector(), b.vector())  # the four counts, read straight from the stored JSON
        assert styles[1] == (count_style("**bold** answer", tokens=9), count_style("- item", tokens=3))
        assert store.style_battles(after_id=last) == ([], [], [], last)  # nothing new since
        assert store.log_vote(make_vote("newer", conv_metadata=conv_metadata(b, a), categories=["code"]))
        assert store.style_battles(after_id=last)[:3] == ([("vicuna-7b", "smollm2", "model_a")],
                                                          [(b.vector(), a.vector())], [["code"]])


def test_plain_sql_reads_with_placeholders_work_on_both_back_ends(backend):
    with backend.open() as store:
        store.log_vote(make_vote("b1", "model_a"))
        store.log_vote(make_vote("b2", "tie"))
        rows = store._read("SELECT battle_id, winner FROM votes WHERE winner = ? AND anony = ? ORDER BY id",
                           ("tie", 1))
        assert [(r["battle_id"], r["winner"]) for r in rows] == [("b2", "tie")]
