"""``python -m vicuna_demo.data.migrate --from logs --to postgresql://...`` on a store written by the
SQLite-only code (tests/data/store_main_8db2ad4.sqlite3): everything copied in order, the salt carried so
client hashes carry on, a second run copies nothing, a copy stopped part-way resumes without duplicates,
and ``python -m vicuna_demo.data.export`` reads the PostgreSQL store exactly as it read the SQLite one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vicuna_demo.data import migrate
from vicuna_demo.data.categories import JUDGE_KEYS
from vicuna_demo.data.storage import LabelRecord, Store

REPO = Path(__file__).resolve().parents[1]
SALT = b"a salt written by the SQLite-era app"


@pytest.fixture
def logs(tmp_path) -> Path:
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "vicuna_demo.sqlite3").write_bytes((REPO / "tests/data/store_main_8db2ad4.sqlite3").read_bytes())
    (folder / "salt").write_bytes(SALT)
    with Store(folder) as store:  # the app's first start after the upgrade migrates the file, then works on
        battle = store.vote_rows()[0]["battle_id"]
        store.flag_votes([battle], "outlier_voter")
        answer = {**{key: False for key in JUDGE_KEYS}, "math": True}
        store.log_labels(LabelRecord(battle, 1.0, "judge:J", ["math"], answer))
    return folder


def run(module: str, *argv: str, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VICUNA_DEMO_DATABASE": uri}
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_copy_moves_everything_in_order_keeps_client_hashes_and_a_rerun_copies_nothing(logs, postgres_uri):
    done = run("vicuna_demo.data.migrate", "--from", str(logs), uri=postgres_uri)
    assert done.returncode == 0, done.stderr
    assert "7 turns, 2 votes, 1 judge_votes, 1 vote_flags, 1 battle_labels copied" in done.stderr
    assert "salt" in done.stderr
    with Store(logs, read_only=True) as old, Store(None, database=postgres_uri) as new:
        assert new.turns() == old.turns() and new.vote_rows(first_per_battle=False) == old.vote_rows(
            first_per_battle=False)
        assert new.judge_vote_rows() == old.judge_vote_rows() and new.battles() == old.battles()
        assert new.vote_flags() == old.vote_flags() and new.label_rows() == old.label_rows() != []
        assert new.client_hash("203.0.113.7") == Store(logs).client_hash("203.0.113.7")
    again = run("vicuna_demo.data.migrate", "--from", str(logs), uri=postgres_uri)
    assert again.returncode == 0
    assert "0 turns, 0 votes, 0 judge_votes, 0 vote_flags, 0 battle_labels copied" in again.stderr
    with Store(None, database=postgres_uri) as new:
        assert new.count_turns() == 7 and new.count_votes() == 2


def test_a_copy_stopped_part_way_resumes_where_it_stopped(logs, postgres_uri, monkeypatch):
    reads = {"n": 0}
    original = Store._read

    def failing_read(self, statement):
        reads["n"] += 1
        if reads["n"] == 3:
            raise ConnectionError("the network went away")
        return original(self, statement)

    monkeypatch.setattr(Store, "_read", failing_read)
    assert migrate.main(["--from", str(logs), "--to", postgres_uri, "--batch", "2"]) == 1
    monkeypatch.undo()
    with Store(None, database=postgres_uri) as new:
        assert new.count_turns() == 4  # two batches of two committed before the failure
    with Store(logs) as old:  # the app kept logging meanwhile
        assert old.log_turn(old.turns()[0])
    assert migrate.main(["--from", str(logs), "--to", postgres_uri, "--batch", "2"]) == 0
    with Store(logs, read_only=True) as old, Store(None, database=postgres_uri) as new:
        assert new.turns() == old.turns() and new.count_turns() == 8


def test_the_export_reads_a_postgresql_store_as_it_reads_the_sqlite_one(logs, postgres_uri, tmp_path):
    assert migrate.main(["--from", str(logs), "--to", postgres_uri]) == 0
    args = ["--include-named", "--conversations", "-", "--battles", "-", "--judge-votes", "-"]
    from_sqlite = run("vicuna_demo.data.export", "--log-dir", str(logs), *args, uri="")
    from_pg = run("vicuna_demo.data.export", "--database", "env", *args, uri=postgres_uri)
    assert from_sqlite.returncode == from_pg.returncode == 0, from_pg.stderr
    assert from_pg.stdout == from_sqlite.stdout and from_pg.stdout.count("\n") == 3 + 2 + 1


def test_a_password_on_the_command_line_is_refused(logs):
    refused = run("vicuna_demo.data.migrate", "--from", str(logs), "--to", "postgresql://u:s3cret@db/x", uri="")
    assert refused.returncode == 2 and "PGPASSWORD" in refused.stderr and "s3cret" not in refused.stderr
