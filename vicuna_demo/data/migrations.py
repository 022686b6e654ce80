"""The store's schema: an ordered tuple of numbered migration functions, applied by ``migrate``.

The number of migrations a database has had is kept in ``PRAGMA user_version``; ``migrate`` applies
the missing ones in one transaction, so a new file becomes a current store and a reopen changes
nothing. Never edit or reorder a migration that has shipped: add a new one at the end.

1. ``turns``: one row per model turn.       2. ``votes``: one row per human vote.
3. indexes.                                  4. triggers that make both tables append-only.
5. ``judge_votes``: LLM-as-a-judge verdicts on side-by-side rounds, their own kind of vote (never
   mixed with ``votes``), append-only like the others.
6. ``votes.conv_metadata``: both answers' style counts at vote time (FastChat's ``conv_metadata``, JSON
   text; NULL for votes stored before it), for style-controlled ratings; ``votes.shown``: how much of
   each reply of the last round the visitor saw (JSON); ``votes.sampling``: the arena's pair-sampling
   weights in force when an anonymous battle's pair was drawn (JSON); ``votes.categories``: the battle's
   category labels (JSON list, categories.py); an index for the daily vote cap; ``vote_flags``: votes
   found not to count after they were stored (the outlier-voter check), append-only: a flagged battle
   is read as not counted, with the flag's reason.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable


def _m001_create_turns(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE turns (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL,
            turn_index INTEGER NOT NULL,
            tstamp REAL NOT NULL,
            client_hash TEXT NOT NULL,
            model TEXT NOT NULL,
            template TEXT NOT NULL,
            params TEXT NOT NULL,
            messages TEXT NOT NULL,
            reply TEXT NOT NULL,
            finish_reason TEXT NOT NULL,
            n_tokens INTEGER NOT NULL,
            ttft_s REAL,
            tok_s REAL,
            moderation TEXT NOT NULL,
            moderation_categories TEXT NOT NULL,
            error TEXT,
            battle_id TEXT,
            side TEXT CHECK (side IS NULL OR side IN ('a', 'b'))
        )"""
    )


def _m002_create_votes(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE votes (
            id INTEGER PRIMARY KEY,
            battle_id TEXT NOT NULL,
            tstamp REAL NOT NULL,
            client_hash TEXT NOT NULL,
            anony INTEGER NOT NULL,
            model_a TEXT NOT NULL,
            model_b TEXT NOT NULL,
            winner TEXT NOT NULL CHECK (winner IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
            counted INTEGER NOT NULL,
            not_counted_reason TEXT,
            conversation_a_id TEXT NOT NULL,
            conversation_b_id TEXT NOT NULL
        )"""
    )


def _m003_indexes(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX turns_by_conversation ON turns (conversation_id, turn_index)")
    db.execute("CREATE INDEX votes_by_battle ON votes (battle_id)")


def _append_only(db: sqlite3.Connection, table: str) -> None:
    for action in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )


def _m004_append_only(db: sqlite3.Connection) -> None:
    for table in ("turns", "votes"):
        _append_only(db, table)


def _m005_create_judge_votes(db: sqlite3.Connection) -> None:
    # winner: the verdict that counts (both answer orders agree, else 'tie'), or 'no_verdict' when an
    # order gave none or the judge failed. g1/g2: each order's own verdict, in model_a/model_b terms
    # (g1 shows model_a's answer first, g2 shows model_b's first); NULL = no verdict in that order.
    db.execute(
        """CREATE TABLE judge_votes (
            id INTEGER PRIMARY KEY,
            battle_id TEXT NOT NULL,
            tstamp REAL NOT NULL,
            client_hash TEXT NOT NULL,
            judge TEXT NOT NULL,
            prompt TEXT NOT NULL,
            model_a TEXT NOT NULL,
            model_b TEXT NOT NULL,
            winner TEXT NOT NULL CHECK (winner IN ('model_a', 'model_b', 'tie', 'no_verdict')),
            g1_winner TEXT CHECK (g1_winner IS NULL OR g1_winner IN ('model_a', 'model_b', 'tie')),
            g2_winner TEXT CHECK (g2_winner IS NULL OR g2_winner IN ('model_a', 'model_b', 'tie')),
            g1_judgment TEXT NOT NULL,
            g2_judgment TEXT NOT NULL,
            error TEXT,
            n_turns INTEGER NOT NULL,
            conversation_a_id TEXT NOT NULL,
            conversation_b_id TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX judge_votes_by_battle ON judge_votes (battle_id)")
    _append_only(db, "judge_votes")


def _m006_vote_style_and_shown(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE votes ADD COLUMN conv_metadata TEXT")
    db.execute("ALTER TABLE votes ADD COLUMN shown TEXT")
    db.execute("ALTER TABLE votes ADD COLUMN sampling TEXT")
    db.execute("ALTER TABLE votes ADD COLUMN categories TEXT")
    db.execute("CREATE INDEX votes_by_client ON votes (client_hash, tstamp)")
    db.execute(
        """CREATE TABLE vote_flags (
            id INTEGER PRIMARY KEY,
            battle_id TEXT NOT NULL,
            tstamp REAL NOT NULL,
            reason TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX vote_flags_by_battle ON vote_flags (battle_id)")
    _append_only(db, "vote_flags")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _m001_create_turns,
    _m002_create_votes,
    _m003_indexes,
    _m004_append_only,
    _m005_create_judge_votes,
    _m006_vote_style_and_shown,
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> int:
    """Apply the migrations this database lacks, all in one transaction; return the new version.

    ``db`` must be in autocommit mode (isolation_level=None).
    """
    db.execute("BEGIN IMMEDIATE")  # read the version under the write lock: safe across processes
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            step(db)
            db.execute(f"PRAGMA user_version = {number}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return max(version, SCHEMA_VERSION)
