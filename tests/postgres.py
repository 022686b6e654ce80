"""A real PostgreSQL for the tests, started from the ``pgserver`` wheel (no system package, no network).

``PostgresServer.start(dir)`` runs one server for the session in a temporary folder; ``fresh_database()``
gives each test its own empty database (a URI psycopg and the app accept). ``restart()`` stops and starts
the server on the same data, as an operator's restart would. Tests skip with the reason when the
server cannot start here.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import sqlalchemy as sa

_NAMES = itertools.count(1)


class PostgresServer:
    def __init__(self, server, pgdata: Path):
        self._server = server
        self.pgdata = pgdata
        self.uri = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>

    @classmethod
    def start(cls, pgdata: Path) -> "PostgresServer":
        import pgserver  # imported here: a machine without it skips, it does not fail collection

        return cls(pgserver.get_server(pgdata, cleanup_mode="stop"), pgdata)

    def uri_for(self, database: str) -> str:
        head, _, query = self.uri.partition("?")
        return f"{head.rsplit('/', 1)[0]}/{database}?{query}"

    def fresh_database(self) -> str:
        name = f"test_{next(_NAMES)}"
        engine = sa.create_engine(self.uri.replace("postgresql://", "postgresql+psycopg://", 1),
                                  isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        engine.dispose()
        return self.uri_for(name)

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl  # runs it as pgserver's own system user when we are root

        pg_ctl(["-w", *args], pgdata=self.pgdata, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def close(self) -> None:
        self._server.cleanup()
