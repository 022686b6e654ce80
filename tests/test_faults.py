"""Faults injected into the running app, and what visitors and the log see.

- Generation: an engine error mid-stream (scripted engine, fast) and, on the real embedded model, a
  CUDA-style ``torch.OutOfMemoryError`` and a CUDA-style RuntimeError raised from a step (the model's
  embedding layer runs at every prefill and decode step of either back end). The affected replies end
  with a clear message after the text they had, replies on the other model finish, and the engine
  serves the next request.
- The log directory: it cannot be created; it is read-only when the app starts over an existing store;
  the disk fills up mid-run (a small tmpfs; skipped where mounting is not allowed); the log file may no
  longer grow mid-run (RLIMIT_FSIZE on an app subprocess). Chat goes on, the operator gets ONE warning,
  and nothing already stored is damaged.
- The app process is SIGKILLed while a turn is being written (inside its transaction), and at a random
  moment under load: the store opens intact (PRAGMA integrity_check) and holds every turn a visitor saw
  finish.

Moderation outages (service errors, timeouts, the block / allow policy) are tested in
tests/test_moderation.py and, in the running app, tests/test_moderation_app.py.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client

from tests.chat_client import ChatResult, chat, submit_chat, text_of
from tests.engines import RecordingEngine

ROOT = Path(__file__).resolve().parent.parent
APP_ARGS = ["--rate-limit", "0", "--moderation", "off"]
WARNING_TEXT = "vicuna_demo storage problem"


def storage_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vicuna_demo.data.storage" and r.levelno >= logging.WARNING]


def integrity(db_path: Path) -> str:
    with sqlite3.connect(db_path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def stored_users(db_path: Path) -> list[str]:
    """The last user message of every stored turn, in order (read with plain sqlite3, as a recovery would)."""
    import json
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT messages FROM turns ORDER BY id").fetchall()
    return [json.loads(m)[-1]["content"] for (m,) in rows]


# -- generation faults ------------------------------------------------------------------------------------


def test_an_engine_error_mid_stream_ends_that_reply_with_a_message_while_other_replies_finish(launch_app):
    healthy = RecordingEngine(name="Healthy", reply=" ".join(f"word{i}" for i in range(30)), delay_s=0.02)
    faulty = RecordingEngine(name="Faulty", reply=" ".join(f"part{i}" for i in range(30)), delay_s=0.02,
                             fail_after=5)
    url, runtime = launch_app(APP_ARGS, engines={"Healthy": healthy, "Faulty": faulty})
    jobs = {name: submit_chat(Client(url, verbose=False), f"hello {name}", name.rstrip("0123456789"))
            for name in ("Healthy1", "Faulty1", "Healthy2", "Faulty2")}
    results = {name: ChatResult(job.result(timeout=60)[0], job.result()[2]) for name, job in jobs.items()}
    for name in ("Faulty1", "Faulty2"):
        reply = results[name].reply
        assert reply.startswith("part0 part1 part2 part3 part4")  # what had streamed is kept ...
        assert "⚠️ Generation failed: injected fault" in reply   # ... and followed by the reason
    for name in ("Healthy1", "Healthy2"):
        assert results[name].reply.startswith(healthy.reply) and "⚠️" not in results[name].reply
    after = chat(Client(url, verbose=False), "again", "Healthy")
    assert after.reply.startswith(healthy.reply)
    by_model = {}
    for turn in runtime.store.turns():
        by_model.setdefault(turn.model, []).append(turn)
    assert [t.finish_reason for t in by_model["Faulty"]] == ["error", "error"]
    assert all("injected fault" in t.error and t.reply.startswith("part0") for t in by_model["Faulty"])
    assert [t.finish_reason for t in by_model["Healthy"]] == ["stop"] * 3


class StepFault:
    """Once armed, the model's next step raises the given error (once). Installed on the embedding layer,
    which both engine back ends call at every prefill and decode step."""

    def __init__(self, model):
        self.module = model.model.embed_tokens
        self.original = self.module.forward
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.fired = 0

    def arm(self, error: BaseException) -> None:
        with self._lock:
            self._error = error

    def __call__(self, *args, **kwargs):
        with self._lock:
            error, self._error = self._error, None
            if error is not None:
                self.fired += 1
        if error is not None:
            raise error
        return self.original(*args, **kwargs)

    def __enter__(self):
        self.module.forward = self
        return self

    def __exit__(self, *exc_info):
        del self.module.forward


@pytest.fixture(scope="module")
def faulty(embedded_loaded):
    """-> (engine, StepFault): a LocalEngine over its own copy of the embedded model, so that the fault
    touches no other engine."""
    from vicuna_demo.engines.local import start_engine
    loaded = dataclasses.replace(embedded_loaded, model=copy.deepcopy(embedded_loaded.model))
    with StepFault(loaded.model) as fault:
        engine = start_engine(loaded)
        engine.warmup()
        yield engine, fault
        engine.close()


def streamed_reply(job) -> str:
    """The assistant text a running /chat job has shown so far."""
    outputs = job.outputs()
    if not outputs:
        return ""
    assistants = [text_of(m) for m in outputs[-1][0] if m["role"] == "assistant"]
    return assistants[-1].rstrip("▌") if assistants else ""


@pytest.mark.slow
@pytest.mark.parametrize("error, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)"),
     "ran out of GPU memory"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "Generation failed"),
], ids=["out-of-memory", "cuda-error"])
def test_a_failing_step_ends_the_affected_replies_with_a_clear_message_others_finish_and_the_engine_serves_on(
        embedded_engine, faulty, launch_app, error, message):
    engine, fault = faulty
    url, runtime = launch_app(APP_ARGS, engines={"SmolLM2": embedded_engine, "Faulty": engine})
    hit = [submit_chat(Client(url, verbose=False), f"Count from 1 to 100, one number per line. ({i})", "Faulty",
                       temperature=0, max_tokens=160) for i in range(2)]
    spared = [submit_chat(Client(url, verbose=False), q, "SmolLM2", temperature=0, max_tokens=24)
              for q in ("Name three colours.", "What is the capital of France?")]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(streamed_reply(job) for job in hit):
        time.sleep(0.1)
    assert all(streamed_reply(job) for job in hit), "the faulty model's replies never started"
    fired_before = fault.fired
    fault.arm(error)  # mid-stream: both replies have shown text

    for job in hit:
        reply = ChatResult(job.result(timeout=240)[0], "").reply
        partial, _, notice = reply.partition("\n\n> ⚠️ ")
        assert partial.strip(), reply            # the text streamed before the fault is kept
        assert message in notice, reply
    for job in spared:
        reply = ChatResult(job.result(timeout=240)[0], "").reply
        assert reply.strip() and "⚠️" not in reply and "token" in reply  # finished, with its statistics line
    assert fault.fired == fired_before + 1

    after = chat(Client(url, verbose=False), "Say hello.", "Faulty", temperature=0, max_tokens=16, timeout=240)
    assert after.notice == "" and after.reply.strip() and "⚠️" not in after.reply
    turns = runtime.store.turns()
    failed = [t for t in turns if t.model == "Faulty" and t.finish_reason == "error"]
    assert len(failed) == 2 and all(message in t.error for t in failed)
    spared_turns = [t for t in turns if t.model == "SmolLM2"]
    assert len(spared_turns) == 2 and all(t.finish_reason in ("stop", "length") for t in spared_turns)


def test_a_visitor_who_leaves_mid_reply_still_has_the_turn_logged_as_cancelled(launch_app):
    """A cancelled request (gradio_client) and a dropped event stream (a closed tab) both stop the reply;
    the turn is logged with what had streamed, finish reason 'cancelled'."""
    engine = RecordingEngine(name="Slow", reply=" ".join(f"w{i}" for i in range(200)), delay_s=0.05)
    url, runtime = launch_app(APP_ARGS, engines={"Slow": engine})
    job = submit_chat(Client(url, verbose=False), "cancel me", "Slow")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(streamed_reply(job).split()) < 5:
        time.sleep(0.05)
    assert job.cancel()
    base = url.rstrip("/")
    event_id = httpx.post(f"{base}/gradio_api/call/chat", json={"data": ["close my tab", "Slow", "", 0.7, 1.0, 64, 1.0]},
                          timeout=30).json()["event_id"]
    with httpx.stream("GET", f"{base}/gradio_api/call/chat/{event_id}", timeout=30) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n > 12:
                break  # the browser tab goes away
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and runtime.store.count_turns() < 2:
        time.sleep(0.1)
    turns = {t.messages[-1]["content"]: t for t in runtime.store.turns()}
    assert set(turns) == {"cancel me", "close my tab"}
    for turn in turns.values():
        assert turn.finish_reason == "cancelled"
        assert turn.reply.startswith("w0 w1") and len(turn.reply.split()) < 200  # what had streamed, then stopped


# -- the log directory ------------------------------------------------------------------------------------


def chat_three_times(url: str, tag: str) -> None:
    client = Client(url, verbose=False)
    for i in range(3):
        result = chat(client, f"{tag} {i}", "Recorder")
        assert result.notice == "" and result.reply.startswith("Hello from the recording engine.")


def test_a_log_dir_that_cannot_be_created_leaves_chat_working_with_one_warning(launch_app, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vicuna_demo.data.storage")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    url, runtime = launch_app([*APP_ARGS, "--log-dir", str(blocker / "logs")],
                              engines={"Recorder": RecordingEngine()})
    chat_three_times(url, "no log dir")
    warnings = storage_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert str(blocker / "logs") in warnings[0].getMessage() and "keeps running" in warnings[0].getMessage()


@pytest.fixture
def read_only_view(tmp_path):
    """read_only_view(folder) -> a path where ``folder`` cannot be written: chmod for an ordinary user
    (root ignores modes), a read-only bind mount for root; skip where root may not mount."""
    undo = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            for path in (*folder.iterdir(), folder):
                mode = path.stat().st_mode
                undo.append(lambda p=path, m=mode: p.chmod(m))
                path.chmod(0o555 if path.is_dir() else 0o444)
            return folder
        view = tmp_path / "read-only-view"
        view.mkdir()
        for command in (["mount", "--bind", str(folder), str(view)], ["mount", "-o", "remount,ro,bind", str(view)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(view)], capture_output=True)
                pytest.skip(f"cannot make a read-only view as root here: {done.stderr.strip()}")
        undo.append(lambda: subprocess.run(["umount", "-l", str(view)], capture_output=True))
        return view

    yield make
    for step in reversed(undo):
        step()


def test_a_read_only_log_dir_over_an_existing_store_leaves_chat_working_with_one_warning_and_the_store_intact(
        launch_app, tmp_path, caplog, read_only_view):
    log_dir = tmp_path / "logs"
    url, runtime = launch_app([*APP_ARGS, "--log-dir", str(log_dir)], engines={"Recorder": RecordingEngine()})
    chat_three_times(url, "before")
    before = stored_users(log_dir / "vicuna_demo.sqlite3")
    runtime.store.close()  # the app stops; its store is closed cleanly
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="vicuna_demo.data.storage")
    view = read_only_view(log_dir)
    url, _ = launch_app([*APP_ARGS, "--log-dir", str(view)], engines={"Recorder": RecordingEngine()})
    chat_three_times(url, "read-only")
    warnings = storage_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert str(view) in warnings[0].getMessage()
    assert before == ["before 0", "before 1", "before 2"]
    assert stored_users(log_dir / "vicuna_demo.sqlite3") == before
    assert integrity(log_dir / "vicuna_demo.sqlite3") == "ok"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (a disk that can really fill up); skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    assert os.statvfs(disk).f_bavail == 0
    return filler


def test_a_disk_filling_up_mid_run_leaves_chat_working_with_one_warning_and_stored_turns_intact(
        launch_app, small_disk, caplog):
    caplog.set_level(logging.WARNING, logger="vicuna_demo.data.storage")
    log_dir = small_disk / "logs"
    url, runtime = launch_app([*APP_ARGS, "--log-dir", str(log_dir)], engines={"Recorder": RecordingEngine()})
    chat_three_times(url, "before")
    before = [(t.conversation_id, t.turn_index, t.messages, t.reply) for t in runtime.store.turns()]
    filler = fill(small_disk)
    chat_three_times(url, "disk full")
    warnings = storage_warnings(caplog)
    assert len(warnings) == 1 and "database or disk is full" in warnings[0].getMessage()
    filler.unlink()
    chat_three_times(url, "space again")  # the store retries on every write: logging resumes
    assert len(storage_warnings(caplog)) == 1
    runtime.store.close()
    assert integrity(log_dir / "vicuna_demo.sqlite3") == "ok"
    assert stored_users(log_dir / "vicuna_demo.sqlite3") == [
        *(f"before {i}" for i in range(3)), *(f"space again {i}" for i in range(3))]
    from vicuna_demo.data.storage import Store
    with Store(log_dir) as reopened:
        assert [(t.conversation_id, t.turn_index, t.messages, t.reply) for t in reopened.turns()][:3] == before


# -- the app as a subprocess: file-size limit and SIGKILL ----------------------------------------------

LAUNCHER = r"""
import os, sys, time
from pathlib import Path
from app import create_app, setup_logging
from vicuna_demo.config import load_settings
from tests.engines import RecordingEngine

log_dir, port, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3]
settings = load_settings(["--log-dir", log_dir, "--rate-limit", "0", "--moderation", "off"], environ={})
setup_logging("WARNING")
demo, runtime = create_app(settings, engines={"Recorder": RecordingEngine(name="Recorder", delay_s=0.002)})
if hold:
    # Test hook: once the file `hold` exists, the next turn written stops inside its transaction,
    # after its INSERT and before its COMMIT, and says so by creating `hold`.holding.
    def trace(statement):
        if statement.strip().upper() == "COMMIT" and os.path.exists(hold):
            os.remove(hold)
            Path(hold + ".holding").touch()
            time.sleep(600)
    runtime.store._engine.raw_connection().driver_connection.set_trace_callback(trace)  # the one SQLite connection
demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
print("READY", flush=True)
demo.block_thread()
"""


class AppProcess:
    """The app with a recording engine, in its own process; stderr is collected line by line."""

    def __init__(self, log_dir: Path, hold: Path | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "PYTHONPATH": str(ROOT)}
        env.pop("OPENAI_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(log_dir), str(self.port), str(hold or "")],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        ready = threading.Event()
        threading.Thread(target=lambda: self.proc.stdout.readline() == "READY\n" and ready.set(), daemon=True).start()
        if not ready.wait(180):
            self.kill()
            pytest.fail("the app subprocess did not start:\n" + "".join(self.stderr[-30:]))
        httpx.get(self.url, timeout=30).raise_for_status()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def app_process():
    started: list[AppProcess] = []

    def start(log_dir: Path, hold: Path | None = None) -> AppProcess:
        started.append(AppProcess(log_dir, hold))
        return started[-1]

    yield start
    for app in started:
        app.kill()


@pytest.mark.slow
def test_a_log_file_that_may_no_longer_grow_leaves_chat_working_with_one_warning_and_stored_turns_intact(
        app_process, tmp_path):
    """RLIMIT_FSIZE on the running app makes every write that would grow a file fail, as a full disk does."""
    log_dir = tmp_path / "logs"
    app = app_process(log_dir)
    chat_three_times(app.url, "before")
    largest = max(p.stat().st_size for p in log_dir.iterdir() if p.name.startswith("vicuna_demo.sqlite3"))
    resource.prlimit(app.proc.pid, resource.RLIMIT_FSIZE, (largest, resource.RLIM_INFINITY))
    chat_three_times(app.url, "cannot grow")
    resource.prlimit(app.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    chat_three_times(app.url, "room again")
    app.stop()
    warnings = [line for line in app.stderr if WARNING_TEXT in line]
    assert len(warnings) == 1, warnings
    assert "WARNING vicuna_demo.data.storage" in warnings[0] and "keeps running" in warnings[0]
    db = log_dir / "vicuna_demo.sqlite3"
    assert integrity(db) == "ok"
    assert stored_users(db) == [*(f"before {i}" for i in range(3)), *(f"room again {i}" for i in range(3))]


@pytest.mark.slow
def test_the_store_opens_intact_after_the_app_is_killed_inside_a_turns_write(app_process, tmp_path):
    log_dir, hold = tmp_path / "logs", tmp_path / "hold"
    app = app_process(log_dir, hold=hold)
    chat_three_times(app.url, "before")
    hold.touch()
    job = submit_chat(Client(app.url, verbose=False), "being written", "Recorder")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not Path(f"{hold}.holding").exists():
        time.sleep(0.02)
    assert Path(f"{hold}.holding").exists(), "the turn never reached its COMMIT"
    assert not job.done()
    app.kill()
    db = log_dir / "vicuna_demo.sqlite3"
    assert integrity(db) == "ok"
    assert stored_users(db) == ["before 0", "before 1", "before 2"]  # the unfinished turn is simply absent
    from vicuna_demo.data.storage import Store, TurnRecord
    with Store(log_dir) as store:  # what the app does when it starts again
        assert store.ok and store.count_turns() == 3
        assert store.log_turn(TurnRecord(
            conversation_id="after-restart", turn_index=1, tstamp=time.time(), client_hash="0" * 64, model="m",
            template="t", params={}, messages=[{"role": "user", "content": "after restart"}], reply="ok",
            finish_reason="stop", n_tokens=1, ttft_s=None, tok_s=None, moderation="off", moderation_categories=()))
    assert stored_users(db)[-1] == "after restart" and integrity(db) == "ok"


@pytest.mark.slow
def test_every_turn_a_visitor_saw_finish_survives_a_sigkill_under_load(app_process, tmp_path):
    log_dir = tmp_path / "logs"
    app = app_process(log_dir)
    finished: list[str] = []
    sent: list[str] = []
    lock = threading.Lock()

    def visitor(v: int) -> None:
        client = Client(app.url, verbose=False)
        for i in range(10_000):
            message = f"visitor {v} message {i}"
            with lock:
                sent.append(message)
            try:
                result = chat(client, message, "Recorder", timeout=30)
            except Exception:  # noqa: BLE001 - the app was killed
                return
            if result.notice:  # the 50-turn limit: start a new conversation
                client.predict(api_name="/clear")
            else:
                with lock:
                    finished.append(message)

    threads = [threading.Thread(target=visitor, args=(v,), daemon=True) for v in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(finished) < 40:
        time.sleep(0.05)
    started_kill = time.monotonic()
    app.kill()
    with lock:
        finished = list(finished)
    print(f"killed after {len(finished)} finished turns; kill took {time.monotonic() - started_kill:.1f} s")
    assert len(finished) >= 40
    db = log_dir / "vicuna_demo.sqlite3"
    assert integrity(db) == "ok"
    stored = stored_users(db)
    assert set(finished) <= set(stored)        # nothing a visitor saw finish is lost
    assert set(stored) <= set(sent)            # and nothing is invented or torn
    assert len(stored) == len(set(stored))
