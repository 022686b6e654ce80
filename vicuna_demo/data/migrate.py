"""Copy an SQLite store into a PostgreSQL one, so an arena that outgrew one machine keeps its history.

Run::

    PGPASSWORD=... python -m vicuna_demo.data.migrate --from logs --to postgresql://demo@db.internal/arena

``--to`` may be left out when ``VICUNA_DEMO_DATABASE`` holds the URI (a password is accepted only there,
as for the app). Turns, votes, judge votes, vote flags (the outlier check's) and the labels given after votes
(the judge's) are copied in their original order, in batches; each
batch and a note of how far it got (``store_meta``: ``copied:<table>:<source>``) commit together, so
the copy can be stopped at any point and run again: it resumes where it stopped and never copies a
row twice (run it again later and it copies only the rows added since). The SQLite store's client-hash
salt goes along, so a visitor keeps one hash, unless the PostgreSQL store already has a salt of its
own (then it says so). The SQLite store is only read. Exit status: 0 copied (or nothing left), 1 error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import sqlalchemy as sa

from .backends import describe, is_database_uri, uri_has_password
from .queries import BATTLE_LABELS, JUDGE_VOTES, TURNS, VOTES, VOTE_FLAGS
from .storage import SALT_FILENAME, Store, store_path

BATCH = 1000
META = sa.table("store_meta", sa.column("key"), sa.column("value"))


def copy_store(source: Store, target: Store, *, source_name: str, batch: int = BATCH) -> dict[str, int]:
    """Copy what ``target`` lacks of ``source``'s rows -> rows copied per table. Raises on database errors."""
    copied = {}
    for table in (TURNS, VOTES, JUDGE_VOTES, VOTE_FLAGS, BATTLE_LABELS):
        key = f"copied:{table.name}:{source_name}"
        copied[table.name] = 0
        while True:
            with target.transaction() as conn:
                done = conn.execute(sa.select(META.c.value).where(META.c.key == key)).scalar_one_or_none()
                last = int(done or 0)
                rows = source._read(sa.select(table).where(table.c.id > last).order_by(table.c.id).limit(batch))
                if not source.ok:
                    raise RuntimeError(f"cannot read the SQLite store: {source.problem}")
                if not rows:
                    break
                conn.execute(sa.insert(table), [{k: v for k, v in row.items() if k != "id"} for row in rows])
                if done is None:
                    conn.execute(sa.insert(META).values(key=key, value=str(rows[-1]["id"])))
                else:
                    conn.execute(sa.update(META).where(META.c.key == key).values(value=str(rows[-1]["id"])))
            copied[table.name] += len(rows)
    return copied


def carry_salt(log_dir: Path, target: Store) -> str:
    """Give the PostgreSQL store the SQLite store's salt unless it has its own -> what happened, in words."""
    try:
        salt = (log_dir / SALT_FILENAME).read_bytes()
    except OSError:
        return "no salt file beside the SQLite store: the PostgreSQL store keeps (or makes) its own"
    with target.transaction() as conn:
        conn.execute(sa.text("INSERT INTO store_meta (key, value) VALUES ('client_hash_salt', :v) "
                             "ON CONFLICT (key) DO NOTHING"), {"v": salt.hex()})
        kept = conn.execute(sa.select(META.c.value).where(META.c.key == "client_hash_salt")).scalar_one()
    if kept == salt.hex():
        return "client hashes carry on: the PostgreSQL store uses the SQLite store's salt"
    return ("warning: the PostgreSQL store already had its own salt, so a visitor's new rows will not share "
            "a client hash with the copied ones")


def main(argv: list[str] | None = None, environ=None) -> int:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m vicuna_demo.data.migrate",
                                     description="Copy an SQLite store (the app's --log-dir) into PostgreSQL; "
                                                 "safe to stop and run again.")
    parser.add_argument("--from", dest="source", required=True, metavar="LOG_DIR",
                        help="the log folder holding vicuna_demo.sqlite3")
    parser.add_argument("--to", dest="target", metavar="URI",
                        help="postgresql://user@host/db (password from PGPASSWORD; default: VICUNA_DEMO_DATABASE)")
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    target_uri = args.target or environ.get("VICUNA_DEMO_DATABASE", "")
    if not is_database_uri(target_uri):
        parser.error("--to: give a postgresql:// URI (or set VICUNA_DEMO_DATABASE)")
    if args.target and uri_has_password(args.target):
        parser.error("--to: the URI holds a password, which the process list shows to everyone: "
                     "set PGPASSWORD or VICUNA_DEMO_DATABASE instead")
    logging.basicConfig(level=logging.ERROR)  # the stores' problems are reported below, once
    log_dir = Path(args.source)
    if not store_path(log_dir).is_file():
        print(f"error: no store in {str(log_dir)!r} (expected {store_path(log_dir)})", file=sys.stderr)
        return 1
    with Store(log_dir, read_only=True, salt=b"-") as source, Store(None, database=target_uri, salt=b"-") as target:
        for store, name in ((source, "the SQLite store"), (target, describe(target_uri))):
            if not store.ok:
                print(f"error: cannot open {name}: {store.problem}", file=sys.stderr)
                return 1
        try:
            print(carry_salt(log_dir, target), file=sys.stderr)
            copied = copy_store(source, target, source_name=str(store_path(log_dir).resolve()), batch=args.batch)
        except Exception as exc:  # noqa: BLE001 - one clear line; what was committed stays, a rerun resumes
            text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            print(f"error: the copy stopped ({type(exc).__name__}: {text[0] if text else ''}); "
                  "run the same command again to resume", file=sys.stderr)
            return 1
    print(", ".join(f"{n} {name}" for name, n in copied.items()) + f" copied to {describe(target_uri)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
