"""The append-only log of chat turns and arena votes: ``<log_dir>/vicuna_demo.sqlite3`` by default, or a
PostgreSQL database shared by several app replicas (``--database postgresql://...``; see backends.py).

The app writes one row per model turn (``Store.log_turn``), one per human vote (``Store.log_vote``),
one per judge verdict on a side-by-side round (``Store.log_judge_vote``: its own table, never
mixed with human votes) and one per category labelling after a vote (``Store.log_labels``);
ratings read ``Store.battles()`` / ``Store.judge_battles()``,
``python -m vicuna_demo.data.export`` reads the rest. Rows are never updated or deleted (triggers
refuse it on both back ends); a regenerated reply is a new row for the same turn.

- Modules: the records and the values their fields take are in ``records.py``; the reads (battles,
  judge verdicts, turns, conversations) in ``queries.py``; the engine per back end in ``backends.py``;
  this module keeps the connection, writes, failure handling and privacy. SQL goes through SQLAlchemy
  Core, the same statements on both back ends.
- Schema: ``migrations.MIGRATIONS`` is an ordered tuple of numbered functions; opening a store applies
  the missing ones in a single transaction, so an empty database becomes a current store and a reopen
  changes nothing (see migrations.py for where the version is kept).
- Durability: one transaction per record. SQLite: WAL journal; a process killed mid-write leaves the
  store intact (the unfinished record is simply absent). PostgreSQL: a record is acknowledged (True)
  only once committed.
- Threads: SQLite: one connection shared behind a lock (gradio calls from many worker threads); other
  processes may open the same file, SQLite's own locking (30 s busy timeout) serialises them.
  PostgreSQL: a pool of connections, one per concurrent call.
- Failures, SQLite: if the directory cannot be written, the file is not a database, or the disk is
  full, the store logs ONE warning on logger ``vicuna_demo.data.storage`` and carries on: ``log_*``
  return False, reads return empty results, nothing raises. It retries on every call, so a store whose
  disk frees up resumes logging. Bugs in the caller (e.g. an unknown winner) do raise ValueError.
- Failures, PostgreSQL: a write that fails because the server went away is retried on a fresh
  connection for ``WRITE_RETRY_S``; if it still fails, ``log_*`` raises ``StoreUnavailable`` so the
  service tells the visitor (a vote is never silently dropped). Reads fail soft as on SQLite. The
  URI's password never appears in a log line or a ``problem``.
- Privacy: the store never sees raw IPs. ``client_hash(ip)`` is HMAC-SHA-256 keyed by a random
  salt kept in ``<log_dir>/salt`` (mode 0600, created once), in the database's ``store_meta`` for a
  PostgreSQL store (so replicas hash alike), or passed in. With no writable log dir, the salt is
  temporary and hashes change on restart. IPv4 space is small: anyone holding the salt can reverse
  the hashes, so the salt must not be published with exports.

Use::

    store = Store("logs")            # NullStore() when logging is disabled
    store = Store(None, database="postgresql://demo@db/arena")
    store.log_turn(TurnRecord(...)); store.log_vote(VoteRecord(...))
    compute_leaderboard(store.battles())
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .backends import describe, is_database_uri, is_disconnect, make_engine, sqlite_connect
from .migrations import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version  # noqa: F401 - MIGRATIONS for tests
from .queries import StoreQueries
# the records and their values live in records.py; importing them from here keeps working
from .records import (JUDGE_COLUMNS, JUDGE_WINNERS, JSON_LABEL_COLUMNS, JSON_TURN_COLUMNS,  # noqa: F401
                      JSON_VOTE_COLUMNS, LABEL_COLUMNS, SIDES, TURN_COLUMNS, VOTE_COLUMNS, WINNERS, JudgeVoteRecord,
                      LabelRecord, TurnRecord, VoteRecord, encode_json, is_moderated)

LOGGER = logging.getLogger("vicuna_demo.data.storage")
DB_FILENAME = "vicuna_demo.sqlite3"
SALT_FILENAME = "salt"
WRITE_RETRY_S = 15.0  # a shared store reconnects and retries a failed write this long before telling the visitor


# --- schema: see migrations.py -------------------------------------------------------------

def store_path(log_dir: str | os.PathLike) -> Path:
    return Path(log_dir) / DB_FILENAME


# --- the store ----------------------------------------------------------------------------


class StoreUnavailable(RuntimeError):
    """A PostgreSQL write that still failed after reconnecting for ``WRITE_RETRY_S``: tell the visitor."""


class Store(StoreQueries):
    """The log, in SQLite or PostgreSQL. Never raises on SQLite I/O trouble: see the module docstring."""

    def __init__(self, log_dir: str | os.PathLike | None, *, salt: bytes | None = None, read_only: bool = False,
                 database: str | None = None):
        """Open (creating and migrating) the store in ``log_dir``, or in the PostgreSQL ``database``.

        ``read_only=True`` (for export) creates nothing, runs no migrations, refuses writes, and
        reports a missing or out-of-date store through ``problem``.
        """
        self.database = database or None
        self.shared = self.database is not None  # replicas may share it: state they share lives here
        self.log_dir = Path(log_dir) if log_dir not in (None, "") else None
        self.path = store_path(self.log_dir) if self.log_dir is not None else None
        self.where = describe(self.database) if self.shared else str(self.path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._engine: sa.Engine | None = None
        self._closed = False
        self._warned = False
        self._problem: str | None = None
        self._salt_note: str | None = None
        self._salt: bytes | None = bytes(salt) if salt is not None else None
        salt_problem = None
        if self._salt is None and (read_only or self.shared):
            self._salt = secrets.token_bytes(32)  # a shared store's own salt replaces it once opened
        elif self._salt is None:
            try:
                self._salt = _load_or_create_salt(self.log_dir)
            except OSError as exc:
                self._salt = secrets.token_bytes(32)
                salt_problem = f"cannot keep the client-hash salt in {self.log_dir / SALT_FILENAME} ({exc})"
        salt_note = salt_problem and f"{salt_problem}; using a temporary salt, so client hashes change on restart"
        self._salt_note = salt_note
        self._salt_given = salt is not None
        if self._open() and salt_note:
            self._report(salt_note)

    # -- health --

    @property
    def ok(self) -> bool:
        """True while the last operation succeeded."""
        return self._problem is None

    @property
    def problem(self) -> str | None:
        """Why the last operation failed, or None."""
        return self._problem

    def _report(self, problem: str) -> None:
        with self._lock:
            self._problem = problem
            first = not self._warned
            self._warned = True
        if first and self._salt_note and self._salt_note not in problem:
            problem = f"{problem}; also {self._salt_note}"
        if first:
            LOGGER.warning(
                "vicuna_demo storage problem: %s. The demo keeps running, but turns and votes "
                "that fail to save are %s (store: %s). Further storage errors are logged at debug level.",
                problem, "reported to the visitor" if self.shared else "lost", self.where)
        else:
            LOGGER.debug("vicuna_demo storage problem: %s", problem)

    def _error_text(self, exc: BaseException) -> str:
        """An error's message, without SQL or parameters, and never the URI's password."""
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        text = lines[0] if lines else type(exc).__name__
        if self.database:
            password = _password(self.database)
            if password:
                text = text.replace(password, "***")
        return text

    # -- connection --

    def _connect(self) -> sqlite3.Connection:
        """The SQLite connection (one, shared behind the lock)."""
        return sqlite_connect(self.path, read_only=self.read_only)

    def _open(self) -> bool:
        """Make sure a migrated engine exists; report (once) and return False if not."""
        with self._lock:
            if self._engine is not None:
                return True
            if self._closed:
                self._report("the store was closed")
                return False
            engine = None
            try:
                if self.shared:
                    engine = make_engine(self.database, read_only=self.read_only)
                else:
                    if self.read_only and not self.path.is_file():
                        raise FileNotFoundError(f"no store file {self.path}")
                    if not self.read_only:
                        self.log_dir.mkdir(parents=True, exist_ok=True)
                    engine = make_engine(self.path, read_only=self.read_only, connect=self._connect)
                with engine.connect() as conn:
                    if self.read_only:
                        with conn.begin():
                            version = schema_version(conn)
                        if version < SCHEMA_VERSION:
                            raise _Outdated(f"schema version {version} is older than {SCHEMA_VERSION}; "
                                            "open it once read-write (e.g. start the app) to migrate it")
                    else:
                        version = migrate(conn.execution_options(write=True))
                        if version > SCHEMA_VERSION:
                            LOGGER.info("store %s has schema version %d, newer than this code (%d)",
                                        self.where, version, SCHEMA_VERSION)
                    if self.shared and not self._salt_given:
                        self._salt = shared_salt(conn, create=not self.read_only) or self._salt
            except (OSError, sqlite3.Error, sa.exc.SQLAlchemyError, _Outdated) as exc:
                if engine is not None:
                    engine.dispose()
                self._report(f"cannot open {self.where}: {self._error_text(exc)}")
                return False
            self._engine = engine
            self._problem = None
            return True

    def transaction(self) -> Iterator[sa.Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite) for the shared-state helpers; raises on trouble."""
        return _transaction(self)

    def _write(self, table: str, columns: tuple[str, ...], values: tuple) -> bool:
        if self.read_only:
            self._report("the store was opened read-only")
            return False
        statement = sa.insert(sa.table(table, *map(sa.column, columns))).values(dict(zip(columns, values)))
        deadline = time.monotonic() + WRITE_RETRY_S
        delay = 0.1
        while True:
            try:
                with self.transaction() as conn:
                    conn.execute(statement)
            except (OSError, sqlite3.Error, sa.exc.SQLAlchemyError, _Unopened) as exc:
                problem = (self._problem if isinstance(exc, _Unopened)
                           else f"could not save a row in {table}: {self._error_text(exc)}")
                if not self.shared:
                    if not isinstance(exc, _Unopened):
                        self._report(problem)
                    return False
                # a shared store: the server may be restarting; reconnect and try again, then tell the visitor
                if time.monotonic() + delay < deadline and (isinstance(exc, _Unopened) or is_disconnect(exc)):
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if not isinstance(exc, _Unopened):
                    self._report(problem)
                raise StoreUnavailable(f"could not save a row in {table}: the database is unreachable") from None
            with self._lock:
                self._problem = None
            return True

    def _read(self, statement: sa.Executable | str, params: tuple = ()) -> list[sa.RowMapping]:
        """Rows of a query as mappings (``row["column"]``); [] on trouble (reported once).

        ``statement`` is a SQLAlchemy Core query, or plain SQL that both back ends accept, with ``?``
        placeholders filled from ``params`` in order."""
        if isinstance(statement, str):
            statement, params = _plain_sql(statement, params)
        else:
            params = {}
        with self._lock if not self.shared else _NO_LOCK:
            if not self._open():
                return []
            try:
                with self._engine.connect() as conn:
                    return list(conn.execute(statement, params).mappings())
            except (OSError, sqlite3.Error, sa.exc.SQLAlchemyError) as exc:
                self._report(f"could not read {self.where}: {self._error_text(exc)}")
                return []

    # -- writing --

    def client_hash(self, ip: str) -> str:
        """Salted hash (HMAC-SHA-256, hex) of a client address; the raw address is never stored."""
        return hmac.new(self._salt, ip.encode("utf-8"), hashlib.sha256).hexdigest()

    def log_turn(self, rec: TurnRecord) -> bool:
        """Append one model turn; False if it could not be stored (a warning is logged once)."""
        if rec.side not in SIDES:
            raise ValueError(f"side must be 'a', 'b' or None, got {rec.side!r}")
        values = tuple(encode_json(getattr(rec, c)) if c in JSON_TURN_COLUMNS else getattr(rec, c)
                       for c in TURN_COLUMNS)
        return self._write("turns", TURN_COLUMNS, values)

    def log_vote(self, rec: VoteRecord) -> bool:
        """Append one vote; False if it could not be stored (a warning is logged once)."""
        if rec.winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}, got {rec.winner!r}")
        values = tuple(int(v) if c in ("anony", "counted") else
                       (None if v is None else encode_json(v)) if c in JSON_VOTE_COLUMNS else v
                       for c, v in ((c, getattr(rec, c)) for c in VOTE_COLUMNS))
        return self._write("votes", VOTE_COLUMNS, values)

    def flag_votes(self, battle_ids: list[str], reason: str) -> bool:
        """Mark the votes of these battles as not counted (append-only: one row per battle in vote_flags)."""
        ok = True
        for battle_id in battle_ids:
            ok &= self._write("vote_flags", ("battle_id", "tstamp", "reason"), (battle_id, time.time(), reason))
        return ok

    def log_labels(self, rec: LabelRecord) -> bool:
        """Append the labels a labeller gave a battle after its vote (``battle_labels``, append-only)."""
        if not rec.labeller or not isinstance(rec.labels, list):
            raise ValueError(f"a label record needs a labeller and a list of labels, got {rec!r}")
        values = tuple(None if getattr(rec, c) is None else encode_json(getattr(rec, c)) if c in JSON_LABEL_COLUMNS
                       else getattr(rec, c) for c in LABEL_COLUMNS)
        return self._write("battle_labels", LABEL_COLUMNS, values)

    def log_judge_vote(self, rec: JudgeVoteRecord) -> bool:
        """Append one judge verdict; False if it could not be stored (a warning is logged once)."""
        if rec.winner not in JUDGE_WINNERS:
            raise ValueError(f"winner must be one of {', '.join(JUDGE_WINNERS)}, got {rec.winner!r}")
        for order in (rec.g1_winner, rec.g2_winner):
            if order not in (None, "model_a", "model_b", "tie"):
                raise ValueError(f"an order's verdict must be model_a, model_b, tie or None, got {order!r}")
        return self._write("judge_votes", JUDGE_COLUMNS, tuple(getattr(rec, c) for c in JUDGE_COLUMNS))

    def close(self) -> None:
        """Close the connection; later calls store nothing and return empty results."""
        with self._lock:
            self._closed = True
            if self._engine is not None:
                try:
                    self._engine.dispose()
                except (sqlite3.Error, sa.exc.SQLAlchemyError) as exc:  # pragma: no cover - a healthy handle
                    LOGGER.debug("closing %s: %s", self.where, exc)
                self._engine = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _plain_sql(sql: str, params: tuple) -> tuple[sa.TextClause, dict]:
    """``SELECT ... WHERE a = ? AND b = ?`` + (x, y) -> a text clause with named binds, for either back end."""
    parts = sql.split("?")
    if len(parts) - 1 != len(params):
        raise ValueError(f"{len(parts) - 1} placeholders but {len(params)} parameters in {sql!r}")
    text = parts[0] + "".join(f":p{i}{part}" for i, part in enumerate(parts[1:]))
    return sa.text(text), {f"p{i}": value for i, value in enumerate(params)}


class _Outdated(Exception):
    """A read-only store whose schema is older than this code's."""


class _Unopened(Exception):
    """The store could not be opened (already reported)."""


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


_NO_LOCK = _NoLock()


@contextlib.contextmanager
def _transaction(store: Store) -> Iterator[sa.Connection]:
    # SQLite: one connection, so the store's lock is held for the whole transaction. PostgreSQL: the
    # pool gives each thread its own connection; the server serialises what must be.
    with store._lock if not store.shared else _NO_LOCK:
        if not store._open():
            raise _Unopened()
        with store._engine.connect() as conn:
            conn.execution_options(write=True)
            with conn.begin():
                yield conn


class NullStore:
    """A Store that keeps nothing (logging disabled, e.g. ``--log-dir ''``)."""

    ok = True
    problem = None
    read_only = False

    def __init__(self, log_dir: str | os.PathLike | None = None, *, salt: bytes | None = None):
        self._salt = bytes(salt) if salt is not None else secrets.token_bytes(32)

    def client_hash(self, ip: str) -> str:
        return hmac.new(self._salt, ip.encode("utf-8"), hashlib.sha256).hexdigest()

    def log_turn(self, rec: TurnRecord) -> bool:
        return False

    def log_vote(self, rec: VoteRecord) -> bool:
        return False

    def log_judge_vote(self, rec: JudgeVoteRecord) -> bool:
        return False

    def log_labels(self, rec: LabelRecord) -> bool:
        return False

    def later_labels(self, *, after_id: int = 0, battle_ids: set[str] | None = None) -> tuple[dict[str, list], int]:
        return {}, after_id

    def label_rows(self) -> list[dict]:
        return []

    def judge_vote_rows(self) -> list[dict]:
        return []

    def judge_battles(self) -> list[tuple[str, str, str]]:
        return []

    def judge_human_pairs(self) -> list[tuple[str, str]]:
        return []

    def battles(self, *, anony_only: bool = True, counted_only: bool = True) -> list[tuple[str, str, str]]:
        return []

    def vote_rows(self, *, anony_only: bool = False, counted_only: bool = False,
                  first_per_battle: bool = True) -> list[dict]:
        return []

    def style_battles(self, *, anony_only: bool = True, after_id: int = 0,
                      battle_ids: list | None = None) -> tuple[list, list, list, int]:
        return [], [], [], after_id

    def turns(self, conversation_id: str | None = None) -> list[TurnRecord]:
        return []

    def conversations(self) -> list[dict]:
        return []

    def count_turns(self) -> int:
        return 0

    def count_votes(self) -> int:
        return 0

    def count_counted_votes(self, client_hash: str, *, since: float) -> int:
        return 0

    def sampling_history(self) -> list[tuple[float, dict]]:
        return []

    def counted_choices(self, *, anony_only: bool = True) -> list[dict]:
        return []

    def vote_flags(self) -> dict[str, str]:
        return {}

    def flag_votes(self, battle_ids: list[str], reason: str) -> bool:
        return False

    def close(self) -> None:
        pass

    def __enter__(self) -> NullStore:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass


def open_store(log_dir: str | os.PathLike | None, *, salt: bytes | None = None,
               database: str | None = None) -> Store | NullStore:
    """The app's store: PostgreSQL when ``database`` is a URI, else ``Store(log_dir)``, or a ``NullStore``
    when log_dir is None or '' (logging disabled)."""
    if database:
        if not is_database_uri(database):
            raise ValueError(f"--database must be a postgresql:// URI, got {describe(database)!r}")
        return Store(log_dir, salt=salt, database=database)
    if log_dir is None or str(log_dir) == "":
        return NullStore(salt=salt)
    return Store(log_dir, salt=salt)


def shared_salt(conn: sa.Connection, *, create: bool) -> bytes | None:
    """The client-hash salt kept in a shared store (``store_meta``), so every replica hashes alike;
    created once (the first replica to ask wins)."""
    meta = sa.table("store_meta", sa.column("key"), sa.column("value"))
    query = sa.select(meta.c.value).where(meta.c.key == "client_hash_salt")
    with conn.begin():
        value = conn.execute(query).scalar_one_or_none()
        if value is None and create:
            conn.execute(sa.text("INSERT INTO store_meta (key, value) VALUES ('client_hash_salt', :v) "
                                 "ON CONFLICT (key) DO NOTHING"), {"v": secrets.token_hex(32)})
            value = conn.execute(query).scalar_one()
    return bytes.fromhex(value) if value else None


def _password(uri: str) -> str | None:
    try:
        return sa.engine.make_url(uri.replace("postgres://", "postgresql://", 1)).password or None
    except sa.exc.ArgumentError:
        return None


# --- helpers ------------------------------------------------------------------------------


def _load_or_create_salt(log_dir: Path) -> bytes:
    """Read ``<log_dir>/salt``, creating it (0600, 32 random bytes) atomically if missing."""
    path = log_dir / SALT_FILENAME
    try:
        data = path.read_bytes()
        if data:
            return data
    except FileNotFoundError:
        pass
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = log_dir / f".salt.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never overwrites: a racing process keeps its salt
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if not data:
        raise OSError(f"salt file {path} is empty")
    return data


