"""Where the store lives: an SQLite file in the log folder (the default) or a PostgreSQL database.

``make_engine(target)`` builds the SQLAlchemy engine for either back end; ``describe(target)`` names
it for logs and messages with any password removed (a URI's password never appears in a log line,
an error or the page). Everything dialect-specific the store needs lives here:

- SQLite: one connection shared behind the store's lock (as before the move to SQLAlchemy), WAL
  journal, 30 s busy timeout; a write transaction starts with ``BEGIN IMMEDIATE`` so two processes
  on one file serialise instead of failing on a lock upgrade. ``mode=ro`` when opened read-only.
- PostgreSQL (psycopg 3): a connection pool whose connections are checked before use, so a restarted
  server is reconnected to transparently; ``lock(conn, key)`` takes a transaction-scoped advisory
  lock, which is how replicas serialise a migration, a rate-limit check or the evaluation slot.

The password: libpq reads ``PGPASSWORD`` (and ``~/.pgpass``) by itself, so a URI without one works;
a URI with one must come from the environment (``VICUNA_DEMO_DATABASE``), never the command line.
"""

from __future__ import annotations

import os

import sqlite3
import urllib.parse
import zlib
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

BUSY_TIMEOUT_S = 30.0
POOL_SIZE = 8            # connections a replica keeps open to PostgreSQL
POOL_OVERFLOW = 24       # more, opened for a burst of concurrent writes and closed after
CONNECT_TIMEOUT_S = 5


def is_database_uri(target: str | None) -> bool:
    """True for a PostgreSQL URI (postgresql://, postgres://, postgresql+psycopg://)."""
    return bool(target) and str(target).split(":", 1)[0].lower() in ("postgresql", "postgres", "postgresql+psycopg")


def uri_has_password(uri: str) -> bool:
    try:
        return sa.engine.make_url(sa_uri(uri)).password not in (None, "")
    except sa.exc.ArgumentError:
        return False


def database_flag(value: str | None, error) -> str | None:
    """A command's ``--database`` value (None, a postgresql:// URI, or "env": the URI in VICUNA_DEMO_DATABASE)
    -> the URI to open, or None for the SQLite store; ``error(message)`` (argparse's ``parser.error``) for a
    value that is not a URI or that holds a password (the process list shows it to everyone)."""
    database = os.environ.get("VICUNA_DEMO_DATABASE", "") if value == "env" else value
    if value is not None and not is_database_uri(database):
        error("--database: give a postgresql:// URI, or 'env' with VICUNA_DEMO_DATABASE set")
    if value not in (None, "env") and uri_has_password(value):
        error("--database: the URI holds a password, which the process list shows to everyone: "
              "set PGPASSWORD, or pass 'env' with the URI in VICUNA_DEMO_DATABASE")
    return database


def sa_uri(uri: str) -> str:
    """The URI with SQLAlchemy's psycopg 3 driver named (postgres:// and postgresql:// both accepted)."""
    scheme, rest = uri.split(":", 1)
    return ("postgresql+psycopg" if scheme.lower() in ("postgresql", "postgres") else scheme) + ":" + rest


def describe(target: str | Path) -> str:
    """A name for the store fit for logs: the file path, or the URI with its password masked."""
    if not is_database_uri(str(target)):
        return str(target)
    try:
        url = sa.engine.make_url(sa_uri(str(target)))
    except sa.exc.ArgumentError:
        return "postgresql://(unparseable URI)"
    return url.set(drivername="postgresql").render_as_string(hide_password=True)


def make_engine(target: str | Path, *, read_only: bool = False,
                connect: Callable[[], sqlite3.Connection] | None = None) -> sa.Engine:
    """The engine for a store: ``target`` is the SQLite file's path or a PostgreSQL URI.

    ``connect`` (SQLite only) makes the DB-API connection; the store passes its own so tests can
    reach the file as the store does.
    """
    if is_database_uri(str(target)):
        engine = sa.create_engine(sa_uri(str(target)), pool_pre_ping=True, pool_size=POOL_SIZE,
                                  max_overflow=POOL_OVERFLOW, pool_timeout=BUSY_TIMEOUT_S,
                                  connect_args={"connect_timeout": CONNECT_TIMEOUT_S,
                                                "application_name": "vicuna-demo"})
        if read_only:
            @event.listens_for(engine, "begin")
            def _read_only(conn):  # pragma: no cover - trivial
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        return engine
    path = Path(target)
    if connect is None:
        connect = lambda: sqlite_connect(path, read_only=read_only)  # noqa: E731
    engine = sa.create_engine("sqlite://", creator=connect, poolclass=sa.pool.StaticPool)

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # the driver is in autocommit mode (isolation_level=None): SQLAlchemy's transactions are ours
        immediate = conn.get_execution_options().get("write", False) and not read_only
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def sqlite_connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        uri = "file:" + urllib.parse.quote(str(path.absolute())) + "?mode=ro"
        return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
    except sqlite3.Error:
        db.close()
        raise
    return db


def lock(conn: sa.Connection, key: str) -> None:
    """Serialise this transaction with every other one that takes the same key, in any process.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: a write transaction (BEGIN IMMEDIATE,
    see ``make_engine``) already holds the whole file, so nothing more is needed.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(key.encode("utf-8"))})


def is_disconnect(exc: BaseException) -> bool:
    """True when a database error means the connection (or the server) went away, so a retry may work."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or (
        isinstance(exc, sa.exc.TimeoutError))
