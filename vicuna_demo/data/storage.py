"""Append-only SQLite log of chat turns and arena votes, kept in ``<log_dir>/vicuna_demo.sqlite3``.

The app writes one row per model turn (``Store.log_turn``), one per human vote (``Store.log_vote``)
and one per judge verdict on a side-by-side round (``Store.log_judge_vote``: its own table, never
mixed with human votes); ratings read ``Store.battles()`` / ``Store.judge_battles()``,
``python -m vicuna_demo.data.export`` reads the rest. Rows are never updated or deleted (triggers
refuse it); a regenerated reply is a new row for the same turn.

- Modules: the records and the values their fields take are in ``records.py``; the reads (battles,
  judge verdicts, turns, conversations) in ``queries.py``; this module keeps the connection, writes,
  failure handling and privacy. Everything is importable from here as before.
- Schema: ``migrations.MIGRATIONS`` is an ordered tuple of numbered functions; the number of those
  applied is kept in ``PRAGMA user_version``. Opening a store applies the missing ones in a single
  transaction, so an empty or new file becomes a current store and a reopen changes nothing.
- Durability: WAL journal, one transaction per record. A process killed mid-write leaves the
  store intact (the unfinished record is simply absent).
- Threads: one connection shared behind a lock (gradio calls from many worker threads). Other
  processes may open the same store; SQLite's own locking (30 s busy timeout) serialises them.
- Failures: if the directory cannot be written, the file is not a database, or the disk is full,
  the store logs ONE warning on logger ``vicuna_demo.data.storage`` and carries on: ``log_*`` return
  False, reads return empty results, nothing raises. It retries on every call, so a store whose
  disk frees up resumes logging. Bugs in the caller (e.g. an unknown winner) do raise ValueError.
- Privacy: the store never sees raw IPs. ``client_hash(ip)`` is HMAC-SHA-256 keyed by a random
  salt kept in ``<log_dir>/salt`` (mode 0600, created once) or passed in. With no writable log
  dir, the salt is temporary and hashes change on restart. IPv4 space is small: anyone holding
  the salt can reverse the hashes, so the salt file must not be published with exports.

Use::

    store = Store("logs")            # NullStore() when logging is disabled
    store.log_turn(TurnRecord(...)); store.log_vote(VoteRecord(...))
    compute_leaderboard(store.battles())
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from .migrations import MIGRATIONS, SCHEMA_VERSION, migrate  # noqa: F401 - MIGRATIONS re-exported for tests
from .queries import StoreQueries
# the records and their values live in records.py; importing them from here keeps working
from .records import (JUDGE_COLUMNS, JUDGE_WINNERS, JSON_TURN_COLUMNS, JSON_VOTE_COLUMNS,  # noqa: F401
                      SIDES, TURN_COLUMNS, VOTE_COLUMNS, WINNERS, JudgeVoteRecord, TurnRecord, VoteRecord, encode_json, is_moderated)

LOGGER = logging.getLogger("vicuna_demo.data.storage")
DB_FILENAME = "vicuna_demo.sqlite3"
SALT_FILENAME = "salt"
BUSY_TIMEOUT_S = 30.0


# --- schema: see migrations.py -------------------------------------------------------------

def store_path(log_dir: str | os.PathLike) -> Path:
    return Path(log_dir) / DB_FILENAME


# --- the store ----------------------------------------------------------------------------


class Store(StoreQueries):
    """The SQLite log. Never raises on I/O trouble: see the module docstring."""

    def __init__(self, log_dir: str | os.PathLike, *, salt: bytes | None = None, read_only: bool = False):
        """Open (creating and migrating) the store in ``log_dir``.

        ``read_only=True`` (for export) creates nothing, runs no migrations, refuses writes, and
        reports a missing or out-of-date store through ``problem``.
        """
        self.log_dir = Path(log_dir)
        self.path = store_path(log_dir)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._warned = False
        self._problem: str | None = None
        self._salt_note: str | None = None
        salt_problem = None
        if salt is not None:
            self._salt = bytes(salt)
        elif read_only:
            self._salt = secrets.token_bytes(32)
        else:
            try:
                self._salt = _load_or_create_salt(self.log_dir)
            except OSError as exc:
                self._salt = secrets.token_bytes(32)
                salt_problem = f"cannot keep the client-hash salt in {self.log_dir / SALT_FILENAME} ({exc})"
        salt_note = salt_problem and f"{salt_problem}; using a temporary salt, so client hashes change on restart"
        self._salt_note = salt_note
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
                "that fail to save are lost (store: %s). Further storage errors are logged at debug level.",
                problem,
                self.path,
            )
        else:
            LOGGER.debug("vicuna_demo storage problem: %s", problem)

    # -- connection --

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = "file:" + urllib.parse.quote(str(self.path.absolute())) + "?mode=ro"
            return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)

    def _open(self) -> bool:
        """Make sure a migrated connection exists; report (once) and return False if not."""
        with self._lock:
            if self._db is not None:
                return True
            if self._closed:
                self._report("the store was closed")
                return False
            db = None
            try:
                if self.read_only:
                    if not self.path.is_file():
                        raise FileNotFoundError(f"no store file {self.path}")
                    db = self._connect()
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version < SCHEMA_VERSION:
                        raise sqlite3.DatabaseError(
                            f"schema version {version} is older than {SCHEMA_VERSION}; "
                            "open it once read-write (e.g. start the app) to migrate it")
                else:
                    self.log_dir.mkdir(parents=True, exist_ok=True)
                    db = self._connect()
                    db.execute("PRAGMA journal_mode = WAL")
                    version = migrate(db)
                    if version > SCHEMA_VERSION:
                        LOGGER.info("store %s has schema version %d, newer than this code (%d)",
                                    self.path, version, SCHEMA_VERSION)
            except (OSError, sqlite3.Error) as exc:
                if db is not None:
                    db.close()
                self._report(f"cannot open {self.path}: {exc}")
                return False
            self._db = db
            self._problem = None
            return True

    def _write(self, table: str, columns: tuple[str, ...], values: tuple) -> bool:
        if self.read_only:
            self._report("the store was opened read-only")
            return False
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        with self._lock:
            if not self._open():
                return False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute(sql, values)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except (OSError, sqlite3.Error) as exc:
                self._report(f"could not save a row in {table}: {exc}")
                return False
            self._problem = None
            return True

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            if not self._open():
                return []
            try:
                cursor = self._db.execute(sql, params)
                cursor.row_factory = sqlite3.Row
                return cursor.fetchall()
            except (OSError, sqlite3.Error) as exc:
                self._report(f"could not read {self.path}: {exc}")
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
            if self._db is not None:
                try:
                    self._db.close()
                except sqlite3.Error as exc:  # pragma: no cover - close of a healthy handle
                    LOGGER.debug("closing %s: %s", self.path, exc)
                self._db = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


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

    def flag_votes(self, battle_ids: list[str], reason: str) -> bool:
        """Mark the votes of these battles as not counted (append-only: one row per battle in vote_flags)."""
        ok = True
        for battle_id in battle_ids:
            ok &= self._write("vote_flags", ("battle_id", "tstamp", "reason"), (battle_id, time.time(), reason))
        return ok

    def log_judge_vote(self, rec: JudgeVoteRecord) -> bool:
        return False

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

    def style_battles(self, *, anony_only: bool = True, after_id: int = 0) -> tuple[list, list, list, int]:
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


def open_store(log_dir: str | os.PathLike | None, *, salt: bytes | None = None) -> Store | NullStore:
    """``Store(log_dir)``, or a ``NullStore`` when log_dir is None or '' (logging disabled)."""
    if log_dir is None or str(log_dir) == "":
        return NullStore(salt=salt)
    return Store(log_dir, salt=salt)


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


