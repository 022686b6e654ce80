"""State that app replicas must share, kept in their shared store (PostgreSQL; migration 6's tables).

- ``SharedRateLimiter``: the per-visitor sliding one-minute window of ``services.chat.RateLimiter``,
  counted in ``rate_hits`` so a visitor sent to another replica finds the same count. Same
  interface: ``allow(client) -> 0.0`` (allowed and counted) or the seconds to wait.
- ``SharedSlot``: a lease in ``slots`` (e.g. "one evaluation at a time" across replicas), with the
  interface of ``threading.Lock`` that services use: ``acquire(blocking=False)``, ``release()``,
  ``locked()``. The holder renews the lease every ``RENEW_S`` from a background thread; a replica that
  dies stops renewing, and the slot frees itself ``LEASE_S`` later.

Each check is one short transaction under a lock on its key (``backends.lock``), so two replicas
asked at the same moment cannot both get the last allowed message or the slot. Time is wall-clock
(``time.time``): replicas on several hosts must keep their clocks in sync (NTP). If the database is
unreachable, the rate limit lets the message through (the chat does not need the database) and the
slot is refused (an evaluation that cannot be recorded as running must not start); both log once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

import sqlalchemy as sa

from .backends import lock

LOGGER = logging.getLogger("vicuna_demo.data.shared")
WINDOW_S = 60.0
LEASE_S = 90.0
RENEW_S = 30.0
PURGE_EVERY = 1000  # rate checks between sweeps of every visitor's expired hits

RATE_HITS = sa.table("rate_hits", sa.column("id"), sa.column("bucket"), sa.column("client_hash"),
                     sa.column("tstamp"))
SLOTS = sa.table("slots", sa.column("name"), sa.column("holder"), sa.column("expires"))
_ERRORS = (Exception,)  # any database or driver error, or a store that cannot open: all handled alike


class _WarnOnce:
    def __init__(self):
        self._warned = False

    def __call__(self, what: str, exc: BaseException) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        detail = (str(exc).strip().splitlines() or ["the store cannot be opened"])[0][:200]
        LOGGER.log(level, "shared state: %s (%s: %s)", what, type(exc).__name__, detail)


class SharedRateLimiter:
    """Per-visitor messages per minute, counted in the shared store (see the module docstring)."""

    def __init__(self, store, bucket: str, per_minute: int, clock=time.time):
        self.store, self.bucket, self.per_minute, self._clock = store, bucket, per_minute, clock
        self._checks = 0
        self._warn = _WarnOnce()

    def allow(self, client: str) -> float:
        """0.0 when allowed (and counted); otherwise the seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        mine = (RATE_HITS.c.bucket == self.bucket) & (RATE_HITS.c.client_hash == client)
        self._checks += 1
        try:
            with self.store.transaction() as conn:
                lock(conn, f"rate:{self.bucket}:{client}")
                old = RATE_HITS.c.tstamp <= now - WINDOW_S
                conn.execute(sa.delete(RATE_HITS).where(old if self._checks % PURGE_EVERY == 0 else mine & old))
                hits = conn.execute(sa.select(RATE_HITS.c.tstamp).where(mine).order_by(RATE_HITS.c.tstamp)
                                    .limit(self.per_minute)).scalars().all()
                if len(hits) >= self.per_minute:
                    return max(0.0, WINDOW_S - (now - hits[0]))
                conn.execute(sa.insert(RATE_HITS).values(bucket=self.bucket, client_hash=client, tstamp=now))
                return 0.0
        except _ERRORS as exc:  # noqa: BLE001 - the chat works without the database: let the message through
            self._warn("the rate limit could not be checked; the message is let through", exc)
            return 0.0


class SharedSlot:
    """A named lease in the shared store with ``threading.Lock``'s interface (see the module docstring)."""

    def __init__(self, store, name: str, lease_s: float = LEASE_S, renew_s: float = RENEW_S, clock=time.time):
        self.store, self.name, self.lease_s, self.renew_s, self._clock = store, name, lease_s, renew_s, clock
        self.holder = f"{name}:{secrets.token_hex(8)}"  # this replica's own claim
        self._local = threading.Lock()                   # this process holds it at most once too
        self._stop: threading.Event | None = None
        self._warn = _WarnOnce()

    def acquire(self, blocking: bool = False) -> bool:
        if blocking:
            raise ValueError("SharedSlot.acquire never blocks: pass blocking=False")
        if not self._local.acquire(blocking=False):
            return False
        try:
            taken = self._claim()
        except _ERRORS as exc:  # noqa: BLE001 - not recorded as running: do not run
            self._warn(f"the {self.name} slot could not be claimed", exc)
            taken = False
        if not taken:
            self._local.release()
            return False
        self._stop = threading.Event()
        threading.Thread(target=self._renew, args=(self._stop,), name=f"{self.name}-lease", daemon=True).start()
        return True

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        try:
            with self.store.transaction() as conn:
                conn.execute(sa.delete(SLOTS).where((SLOTS.c.name == self.name) & (SLOTS.c.holder == self.holder)))
        except _ERRORS as exc:  # noqa: BLE001 - the lease then runs out by itself
            self._warn(f"the {self.name} slot could not be released; it frees itself within {self.lease_s:g} s", exc)
        finally:
            if self._local.locked():
                self._local.release()

    def locked(self) -> bool:
        """True while any replica holds the slot."""
        if self._local.locked():
            return True
        try:
            with self.store.transaction() as conn:
                row = conn.execute(sa.select(SLOTS.c.expires).where(SLOTS.c.name == self.name)).first()
            return row is not None and row.expires > self._clock()
        except _ERRORS:  # noqa: BLE001 - unknown: say free, acquire decides
            return False

    def _claim(self) -> bool:
        now = self._clock()
        with self.store.transaction() as conn:
            lock(conn, f"slot:{self.name}")
            row = conn.execute(sa.select(SLOTS.c.holder, SLOTS.c.expires).where(SLOTS.c.name == self.name)).first()
            if row is not None and row.expires > now and row.holder != self.holder:
                return False
            conn.execute(sa.delete(SLOTS).where(SLOTS.c.name == self.name))
            conn.execute(sa.insert(SLOTS).values(name=self.name, holder=self.holder, expires=now + self.lease_s))
            return True

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.renew_s):
            try:
                with self.store.transaction() as conn:
                    conn.execute(sa.update(SLOTS).where((SLOTS.c.name == self.name) & (SLOTS.c.holder == self.holder))
                                 .values(expires=self._clock() + self.lease_s))
            except _ERRORS as exc:  # noqa: BLE001 - try again at the next beat
                self._warn(f"the {self.name} lease could not be renewed", exc)
