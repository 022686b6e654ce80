"""Pushing the conversation and vote store to a Hugging Face dataset (Space disks are wiped on restart).

    pusher = start_dataset_push(settings)     # None unless --hf-dataset; pusher.close() pushes a last time
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, Settings
from moderation import scrub

from .data.storage import DB_FILENAME, store_path

log = logging.getLogger("vicuna_demo.publish")


def store_signature(db_file: Path) -> tuple:
    """(table, rows, last rowid) for every table: the store is append-only, so equal signatures mean equal data."""
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30)
    try:
        tables = [name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return tuple((t, *db.execute(f'SELECT count(*), max(rowid) FROM "{t}"').fetchone()) for t in tables)
    finally:
        db.close()


def snapshot_store(source_db: Path, dest: Path, previous: tuple | None = None) -> tuple | None:
    """Copy the live SQLite store to ``dest`` consistently (SQLite's backup API; the app keeps writing).

    Returns the copied data's signature; when it equals ``previous`` and ``dest`` exists, nothing is
    copied (the file keeps its mtime, so the scheduler does not upload it again). None: no store yet."""
    if not source_db.is_file():
        return None
    signature = store_signature(source_db)
    if signature == previous and dest.is_file():
        return signature
    dest.parent.mkdir(parents=True, exist_ok=True)
    fresh = dest.with_name(dest.name + ".new")
    fresh.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source_db}?mode=ro", uri=True, timeout=30)
    try:
        copy = sqlite3.connect(fresh)
        try:
            src.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            copy.close()
    finally:
        src.close()
    os.replace(fresh, dest)
    return store_signature(dest)


def run_id(log_dir: Path) -> str:
    """This log folder's name in the dataset: kept in ``<log_dir>/hf-push-id``, so a persistent disk keeps
    pushing to the same file and a wiped one (a new store) never overwrites an earlier run's file."""
    path = Path(log_dir) / "hf-push-id"
    try:
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    except OSError:
        pass
    new = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
    try:
        path.write_text(new + "\n", encoding="utf-8")
    except OSError:
        pass
    return new


def _snapshot_scheduler_class():
    from huggingface_hub import CommitScheduler  # noqa: PLC0415

    class SnapshotScheduler(CommitScheduler):
        """CommitScheduler that uploads a consistent snapshot of the store, never the live (WAL) files or
        the client-hash salt, and reports failures to ``report`` instead of raising in its thread."""

        def __init__(self, *, source_db: Path, report: Callable[[BaseException | None], None], **kwargs):
            self.source_db, self.report, self.signature = source_db, report, None
            super().__init__(**kwargs)

        def push_to_hub(self):
            try:
                self.signature = snapshot_store(self.source_db, self.folder_path / DB_FILENAME, self.signature)
                result = super().push_to_hub()
            except Exception as exc:  # noqa: BLE001 - the demo must keep serving
                self.report(exc)
                return None
            self.report(None)
            return result

    return SnapshotScheduler


class DatasetPush:
    """Pushes the log store to a Hub dataset every ``every_min`` minutes, in the background.

    Connecting (which creates the private dataset if needed) happens on a thread, so start-up never
    waits on the Hub; while the Hub cannot be reached, it is retried every interval. The first
    failure logs one warning; later failures are DEBUG lines; a recovery logs one INFO line."""

    def __init__(self, repo_id: str, log_dir: str | Path, every_min: float, *, token: str | None = None,
                 endpoint: str | None = None, hf_api=None, scheduler_cls=None):
        self.repo_id, self.log_dir, self.every_min = repo_id, Path(log_dir), float(every_min)
        self.path_in_repo = f"logs/{run_id(self.log_dir)}"
        self.scheduler = None
        self._token = token
        self._endpoint = endpoint
        self._hf_api = hf_api
        self._scheduler_cls = scheduler_cls or _snapshot_scheduler_class()
        self._staging = Path(tempfile.mkdtemp(prefix="vicuna-demo-push-"))
        self._stopped = threading.Event()
        self._failing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._connect, name="hf-dataset-push", daemon=True)

    def start(self) -> "DatasetPush":
        self._thread.start()
        return self

    @property
    def failing(self) -> bool:
        return self._failing

    def _connect(self) -> None:
        from huggingface_hub import HfApi  # noqa: PLC0415
        while not self._stopped.is_set():
            try:
                api = self._hf_api or HfApi(endpoint=self._endpoint, token=self._token)
                scheduler = self._scheduler_cls(
                    source_db=store_path(self.log_dir), report=self._report, repo_id=self.repo_id,
                    repo_type="dataset", folder_path=self._staging, path_in_repo=self.path_in_repo,
                    every=self.every_min, private=True, hf_api=api,
                    allow_patterns=[DB_FILENAME])  # only the finished snapshot, never a half-written copy
            except Exception as exc:  # noqa: BLE001 - e.g. the Hub is unreachable or the token is wrong
                self._report(exc)
                self._stopped.wait(self.every_min * 60)
                continue
            with self._lock:
                if self._stopped.is_set():
                    scheduler.stop()
                    return
                self.scheduler = scheduler
            log.info("Pushing the logs to the dataset %s (%s/) every %g min.", self.repo_id, self.path_in_repo,
                     self.every_min)
            return

    def _report(self, error: BaseException | None) -> None:
        if error is None:
            if self._failing:
                log.info("Pushing the logs to the dataset %s works again.", self.repo_id)
            self._failing = False
            return
        reason = scrub(f"{type(error).__name__}: {error}", (self._token,) if self._token else ())
        if self._failing:
            log.debug("Push to the dataset %s failed again: %s", self.repo_id, reason)
            return
        self._failing = True
        log.warning("Could not push the logs to the Hugging Face dataset %s (%s). The demo keeps working and "
                    "logging to %s; the push is retried every %g min. Check HF_TOKEN (write access) and the "
                    "network.", self.repo_id, reason, self.log_dir, self.every_min)

    def close(self, timeout_s: float = 20.0) -> None:
        """Push what is new one last time (bounded wait), then stop."""
        with self._lock:
            self._stopped.set()
            scheduler = self.scheduler
        finished = True
        if scheduler is not None:
            try:
                scheduler.trigger().result(timeout=timeout_s)
            except TimeoutError:
                finished = False  # still uploading: leave its files alone
            except Exception:  # noqa: BLE001 - reported by the scheduler itself
                pass
            scheduler.stop()
        if finished:
            shutil.rmtree(self._staging, ignore_errors=True)


def start_dataset_push(settings: Settings, environ=None, **overrides: Any) -> DatasetPush | None:
    """Start pushing logs when ``--hf-dataset`` is set (token: HF_TOKEN; endpoint: HF_ENDPOINT)."""
    environ = os.environ if environ is None else environ
    if not settings.hf_dataset:
        return None
    if not settings.log_dir:
        log.warning("--hf-dataset %s is ignored: logging is off (--log-dir ''), so there is nothing to push.",
                    settings.hf_dataset)
        return None
    if settings.hf_push_minutes <= 0:
        raise ConfigError("--hf-push-minutes must be more than 0.")
    token = (environ.get("HF_TOKEN") or "").strip() or None
    if token is None:
        log.info("--hf-dataset: HF_TOKEN is not set; using the token saved by `hf auth login`, if any.")
    return DatasetPush(settings.hf_dataset, settings.log_dir, settings.hf_push_minutes, token=token,
                       endpoint=(environ.get("HF_ENDPOINT") or "").strip() or None, **overrides).start()
