"""The store's schema: an ordered tuple of numbered migration functions, applied by ``migrate``.

Each migration takes a SQLAlchemy ``Connection`` inside the migration's transaction and works on
both back ends: tables and indexes are SQLAlchemy Core objects (rendered in each dialect's SQL);
only the append-only guard differs (SQLite triggers; a PL/pgSQL trigger function on PostgreSQL).
The number of migrations applied is kept in ``PRAGMA user_version`` on SQLite (as it always was, so
a store written before the move to SQLAlchemy opens unchanged) and in the one-row table
``schema_version`` on PostgreSQL. ``migrate`` applies the missing ones in one transaction under a
lock (BEGIN IMMEDIATE / an advisory lock), so replicas starting together migrate once.

To change the schema, add a function at the end of ``MIGRATIONS``; never edit or reorder one that
has shipped. Plain SQL that both dialects accept can go through ``db.exec_driver_sql``; an
append-only table calls ``append_only(db, name)``.

1. ``turns``: one row per model turn.       2. ``votes``: one row per human vote.
3. indexes.                                  4. the append-only guard on both tables.
5. ``judge_votes``: LLM-as-a-judge verdicts on side-by-side rounds, their own kind of vote (never
   mixed with ``votes``), append-only like the others.
6. ``votes.conv_metadata``: both answers' style counts at vote time (FastChat's ``conv_metadata``, JSON
   text; NULL for votes stored before it), for style-controlled ratings; ``votes.shown``: how much of
   each reply of the last round the visitor saw (JSON); ``votes.sampling``: the arena's pair-sampling
   weights in force when an anonymous battle's pair was drawn (JSON); ``votes.categories``: the battle's
   category labels (JSON list, categories.py); an index for the daily vote cap; ``vote_flags``: votes
   found not to count after they were stored (the outlier-voter check), append-only: a flagged battle
   is read as not counted, with the flag's reason.
7. state that replicas share (see shared.py), not records, so not append-only: ``store_meta`` (the
   client-hash salt of a PostgreSQL store), ``rate_hits`` (per-visitor rate limits) and ``slots``
   (leases such as "one evaluation at a time").
8. ``battle_labels``: category labels given to a battle's first prompt after its vote (by the judge
   model, services/after_vote.py: ``labeller`` "judge:<name>", ``labels`` a JSON list, ``answer`` the
   judge's parsed JSON answer), append-only; read merged with ``votes.categories`` (the rules' labels).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from .backends import lock

Migration = Callable[[sa.Connection], None]
_ID = sa.Integer  # rowid alias on SQLite, SERIAL on PostgreSQL


def _create(db: sa.Connection, name: str, *columns: sa.Column | sa.Constraint) -> None:
    sa.Table(name, sa.MetaData(), sa.Column("id", _ID, primary_key=True), *columns).create(db)


def _m001_create_turns(db: sa.Connection) -> None:
    text, real, integer = sa.Text, sa.Float, sa.Integer
    _create(db, "turns",
            sa.Column("conversation_id", text, nullable=False),
            sa.Column("turn_index", integer, nullable=False),
            sa.Column("tstamp", real, nullable=False),
            sa.Column("client_hash", text, nullable=False),
            sa.Column("model", text, nullable=False),
            sa.Column("template", text, nullable=False),
            sa.Column("params", text, nullable=False),
            sa.Column("messages", text, nullable=False),
            sa.Column("reply", text, nullable=False),
            sa.Column("finish_reason", text, nullable=False),
            sa.Column("n_tokens", integer, nullable=False),
            sa.Column("ttft_s", real),
            sa.Column("tok_s", real),
            sa.Column("moderation", text, nullable=False),
            sa.Column("moderation_categories", text, nullable=False),
            sa.Column("error", text),
            sa.Column("battle_id", text),
            sa.Column("side", text),
            sa.CheckConstraint("side IS NULL OR side IN ('a', 'b')", name="turns_side"))


def _m002_create_votes(db: sa.Connection) -> None:
    text = sa.Text
    _create(db, "votes",
            sa.Column("battle_id", text, nullable=False),
            sa.Column("tstamp", sa.Float, nullable=False),
            sa.Column("client_hash", text, nullable=False),
            sa.Column("anony", sa.Integer, nullable=False),
            sa.Column("model_a", text, nullable=False),
            sa.Column("model_b", text, nullable=False),
            sa.Column("winner", text, nullable=False),
            sa.Column("counted", sa.Integer, nullable=False),
            sa.Column("not_counted_reason", text),
            sa.Column("conversation_a_id", text, nullable=False),
            sa.Column("conversation_b_id", text, nullable=False),
            sa.CheckConstraint("winner IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')", name="votes_winner"))


def _m003_indexes(db: sa.Connection) -> None:
    db.exec_driver_sql("CREATE INDEX turns_by_conversation ON turns (conversation_id, turn_index)")
    db.exec_driver_sql("CREATE INDEX votes_by_battle ON votes (battle_id)")


_PG_GUARD = """CREATE OR REPLACE FUNCTION vicuna_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only', ERRCODE = 'insufficient_privilege';
END $$"""


def append_only(db: sa.Connection, table: str) -> None:
    """Refuse UPDATE and DELETE on ``table`` (and TRUNCATE on PostgreSQL), with "<table> is append-only"."""
    if db.dialect.name == "postgresql":
        db.exec_driver_sql(_PG_GUARD)
        db.exec_driver_sql(f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table} "
                           "FOR EACH ROW EXECUTE FUNCTION vicuna_append_only()")
        db.exec_driver_sql(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                           "FOR EACH STATEMENT EXECUTE FUNCTION vicuna_append_only()")
        return
    for action in ("UPDATE", "DELETE"):
        db.exec_driver_sql(
            f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )


def _m004_append_only(db: sa.Connection) -> None:
    for table in ("turns", "votes"):
        append_only(db, table)


def _m005_create_judge_votes(db: sa.Connection) -> None:
    # winner: the verdict that counts (both answer orders agree, else 'tie'), or 'no_verdict' when an
    # order gave none or the judge failed. g1/g2: each order's own verdict, in model_a/model_b terms
    # (g1 shows model_a's answer first, g2 shows model_b's first); NULL = no verdict in that order.
    text = sa.Text
    _create(db, "judge_votes",
            sa.Column("battle_id", text, nullable=False),
            sa.Column("tstamp", sa.Float, nullable=False),
            sa.Column("client_hash", text, nullable=False),
            sa.Column("judge", text, nullable=False),
            sa.Column("prompt", text, nullable=False),
            sa.Column("model_a", text, nullable=False),
            sa.Column("model_b", text, nullable=False),
            sa.Column("winner", text, nullable=False),
            sa.Column("g1_winner", text),
            sa.Column("g2_winner", text),
            sa.Column("g1_judgment", text, nullable=False),
            sa.Column("g2_judgment", text, nullable=False),
            sa.Column("error", text),
            sa.Column("n_turns", sa.Integer, nullable=False),
            sa.Column("conversation_a_id", text, nullable=False),
            sa.Column("conversation_b_id", text, nullable=False),
            sa.CheckConstraint("winner IN ('model_a', 'model_b', 'tie', 'no_verdict')", name="judge_winner"),
            sa.CheckConstraint("g1_winner IS NULL OR g1_winner IN ('model_a', 'model_b', 'tie')", name="judge_g1"),
            sa.CheckConstraint("g2_winner IS NULL OR g2_winner IN ('model_a', 'model_b', 'tie')", name="judge_g2"))
    db.exec_driver_sql("CREATE INDEX judge_votes_by_battle ON judge_votes (battle_id)")
    append_only(db, "judge_votes")


def _m006_vote_style_and_shown(db: sa.Connection) -> None:
    for column in ("conv_metadata", "shown", "sampling", "categories"):
        db.exec_driver_sql(f"ALTER TABLE votes ADD COLUMN {column} TEXT")
    db.exec_driver_sql("CREATE INDEX votes_by_client ON votes (client_hash, tstamp)")
    _create(db, "vote_flags",
            sa.Column("battle_id", sa.Text, nullable=False),
            sa.Column("tstamp", sa.Float, nullable=False),
            sa.Column("reason", sa.Text, nullable=False))
    db.exec_driver_sql("CREATE INDEX vote_flags_by_battle ON vote_flags (battle_id)")
    append_only(db, "vote_flags")


def _m007_shared_state(db: sa.Connection) -> None:
    metadata = sa.MetaData()
    sa.Table("store_meta", metadata, sa.Column("key", sa.Text, primary_key=True),
             sa.Column("value", sa.Text, nullable=False)).create(db)
    sa.Table("rate_hits", metadata, sa.Column("id", _ID, primary_key=True),
             sa.Column("bucket", sa.Text, nullable=False), sa.Column("client_hash", sa.Text, nullable=False),
             sa.Column("tstamp", sa.Float, nullable=False)).create(db)
    db.exec_driver_sql("CREATE INDEX rate_hits_by_client ON rate_hits (bucket, client_hash, tstamp)")
    sa.Table("slots", metadata, sa.Column("name", sa.Text, primary_key=True),
             sa.Column("holder", sa.Text, nullable=False), sa.Column("expires", sa.Float, nullable=False)).create(db)


def _m008_battle_labels(db: sa.Connection) -> None:
    _create(db, "battle_labels",
            sa.Column("battle_id", sa.Text, nullable=False),
            sa.Column("tstamp", sa.Float, nullable=False),
            sa.Column("labeller", sa.Text, nullable=False),
            sa.Column("labels", sa.Text, nullable=False),
            sa.Column("answer", sa.Text))
    db.exec_driver_sql("CREATE INDEX battle_labels_by_battle ON battle_labels (battle_id)")
    append_only(db, "battle_labels")


MIGRATIONS: tuple[Migration, ...] = (
    _m001_create_turns,
    _m002_create_votes,
    _m003_indexes,
    _m004_append_only,
    _m005_create_judge_votes,
    _m006_vote_style_and_shown,
    _m007_shared_state,
    _m008_battle_labels,
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sa.Connection) -> int:
    """How many migrations this database has had (0 for an empty one)."""
    if db.dialect.name == "sqlite":
        return db.exec_driver_sql("PRAGMA user_version").scalar_one()
    if not sa.inspect(db).has_table("schema_version"):
        return 0
    return db.exec_driver_sql("SELECT version FROM schema_version").scalar_one_or_none() or 0


def _set_version(db: sa.Connection, number: int) -> None:
    if db.dialect.name == "sqlite":
        db.exec_driver_sql(f"PRAGMA user_version = {int(number)}")
        return
    db.exec_driver_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    if db.exec_driver_sql("UPDATE schema_version SET version = %(v)s", {"v": number}).rowcount == 0:
        db.exec_driver_sql("INSERT INTO schema_version (version) VALUES (%(v)s)", {"v": number})


def migrate(engine_or_conn: sa.Engine | sa.Connection) -> int:
    """Apply the migrations this database lacks, all in one transaction; return the new version."""
    if isinstance(engine_or_conn, sa.Engine):
        with engine_or_conn.connect() as conn:
            return migrate(conn.execution_options(write=True))
    db = engine_or_conn
    with db.begin():
        lock(db, "vicuna_demo.migrate")  # read the version under the lock: safe across processes
        version = schema_version(db)
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            step(db)
            _set_version(db, number)
    return max(version, SCHEMA_VERSION)
