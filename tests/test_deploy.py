"""Deploying the demo: Space front matter, configuration by environment variables alone, the share link
without network, password protection, start-up warnings, queue positions and per-visitor limits, the
ZeroGPU path (with a stand-in `spaces` module: the real one needs a ZeroGPU Space), and pushing logs
to a Hub dataset (the failure path against a closed local port, the upload path through a recording
HfApi subclass). The app is the real one, started through app.serve() and driven by gradio_client.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import pickle
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import pytest
import yaml
from gradio_client import Client
from gradio_client.utils import Status

from app import create_app, main, serve
from tests.chat_client import stop_app
from tests.engines import RecordingEngine
from vicuna_demo import serving, publish
from vicuna_demo.engines import zerogpu as zerogpu_engine
from vicuna_demo.engines.local import start_engine
from vicuna_demo.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
SYSTEM = RecordingEngine.default_system


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture
def serve_app(tmp_path):
    """start(argv, engines, environ=None, **launch_overrides) -> (url, share_url, runtime): app.serve() without blocking."""
    started = []

    def start(argv=(), engines=None, environ=None, **overrides):
        argv = list(argv)
        if "--log-dir" not in argv:
            argv += ["--log-dir", str(tmp_path / "logs")]
        settings = load_settings(argv, environ=environ or {})
        demo, runtime = create_app(settings, engines=engines)
        started.append((demo, runtime))
        url, share_url = serve(demo, runtime, settings, block=False, server_name="127.0.0.1", quiet=True,
                               **overrides)
        return url, share_url, runtime

    yield start
    for demo, runtime in started:
        demo.close()
        runtime.close()


def chat(client, text, model="Rec", system=SYSTEM):
    """-> (assistant texts, notice) after one /chat call."""
    chatbot, _box, notice = client.predict(text, model, system, 0.7, 1.0, 64, api_name="/chat")
    replies = ["".join(b.get("text", "") for b in m["content"]) for m in chatbot if m["role"] == "assistant"]
    return replies, notice


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class PeakEngine(RecordingEngine):
    """A RecordingEngine that also counts how many replies stream at the same time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = self.peak = 0
        self._count_lock = threading.Lock()

    def stream(self, prompt, params):
        return _Counted(self, super().stream(prompt, params))


class _Counted:
    def __init__(self, engine, reply):
        self._engine, self._reply, self.stats = engine, reply, reply.stats

    def cancel(self):
        self._reply.cancel()

    def __iter__(self):
        engine = self._engine
        with engine._count_lock:
            engine.active += 1
            engine.peak = max(engine.peak, engine.active)
        try:
            yield from self._reply
        finally:
            with engine._count_lock:
                engine.active -= 1


# -- Space front matter and --help ---------------------------------------------------------------------

HF_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
HF_HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "zero-a10g", "a10g-small",
               "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "l40sx1", "l40sx4", "l40sx8", "h100",
               "h100x8"}


def front_matter() -> tuple[dict, str]:
    """The Space front matter README.md opens with (a Space reads it from there)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md does not open with a ---/--- YAML block (the Space front matter)"
    return yaml.safe_load(match.group(1)), "README.md"


def test_space_front_matter_parses_and_pins_the_required_gradio():
    meta, source = front_matter()
    pins = re.findall(r"^gradio==(\S+)\s*$", (REPO / "requirements.txt").read_text(), re.M)

    assert len(pins) == 1, "requirements.txt must pin gradio exactly once"
    assert meta["sdk"] == "gradio"
    assert str(meta["sdk_version"]) == pins[0], f"{source}: sdk_version differs from requirements.txt"
    assert (REPO / meta["app_file"]).is_file() and meta["app_file"] == "app.py"
    assert meta["title"] and meta["emoji"]
    assert {meta["colorFrom"], meta["colorTo"]} <= HF_COLORS
    assert meta["suggested_hardware"] in HF_HARDWARE
    assert isinstance(meta["pinned"], bool)
    assert len(meta.get("short_description", "")) <= 60


def test_help_lists_every_group_and_the_serving_flags_with_their_variables():
    done = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    for group in ("models:", "generation:", "moderation:", "serving:", "logging:"):
        assert group in done.stdout
    for flag, env in (("--share", "VICUNA_DEMO_SHARE"), ("--auth", "VICUNA_DEMO_AUTH"),
                      ("--concurrency", "VICUNA_DEMO_CONCURRENCY"), ("--rate-limit", "VICUNA_DEMO_RATE_LIMIT"),
                      ("--max-input-chars", "VICUNA_DEMO_MAX_INPUT_CHARS"), ("--max-turns", "VICUNA_DEMO_MAX_TURNS"),
                      ("--hf-dataset", "VICUNA_DEMO_HF_DATASET"), ("--hf-push-minutes", "VICUNA_DEMO_HF_PUSH_MINUTES")):
        assert flag in done.stdout and env in done.stdout


# -- environment variables and limits ------------------------------------------------------------------

def test_environment_variables_alone_configure_the_served_app(serve_app):
    engine = RecordingEngine("Rec")
    environ = {"VICUNA_DEMO_MAX_INPUT_CHARS": "20", "VICUNA_DEMO_MAX_TURNS": "2", "VICUNA_DEMO_AUTH": "carol:s3cret",
               "VICUNA_DEMO_MODERATION": "off", "VICUNA_DEMO_RATE_LIMIT": "0"}
    url, _, runtime = serve_app([], engines={"Rec": engine}, environ=environ)

    assert httpx.post(url + "login", data={"username": "carol", "password": "nope"}).status_code == 400
    client = Client(url, auth=("carol", "s3cret"), verbose=False)
    short_system = "Be brief."  # the system prompt counts against the limit too
    _, notice = chat(client, "x" * 30, system=short_system)
    assert notice == "Your message is 30 characters long; the limit is 20. Please shorten it."
    assert engine.received == []
    assert chat(client, "first", system=short_system)[1] == "" and chat(client, "second", system=short_system)[1] == ""
    _, notice = chat(client, "third", system=short_system)
    assert "reached the limit of 2 turns" in notice and "Clear" in notice
    assert len(engine.received) == 2


def test_over_long_input_gets_the_limit_message_and_the_longest_allowed_goes_through(serve_app):
    engine = RecordingEngine("Rec")
    url, _, _ = serve_app(["--max-input-chars", "50", "--moderation", "off"], engines={"Rec": engine})
    client = Client(url, verbose=False)

    _, notice = chat(client, "y" * 51)
    assert "the limit is 50" in notice and engine.received == []
    replies, notice = chat(client, "y" * 50)
    assert notice == "" and engine.received[-1][-1]["content"] == "y" * 50


def test_a_visitor_over_the_rate_limit_gets_the_message(serve_app):
    engine = RecordingEngine("Rec")
    url, _, _ = serve_app(["--rate-limit", "2", "--moderation", "off"], engines={"Rec": engine})
    client = Client(url, verbose=False)

    assert chat(client, "one")[1] == "" and chat(client, "two")[1] == ""
    _, notice = chat(client, "three")

    assert notice.startswith("You are sending messages too fast (limit: 2 per minute). Please wait")
    assert len(engine.received) == 2
    _, notice = chat(Client(url, verbose=False), "four")  # same address, new session: still limited
    assert "too fast" in notice


def test_a_queued_visitor_sees_its_position_while_replies_use_the_concurrency_limit(serve_app):
    engine = PeakEngine("Rec", reply=" ".join(["word"] * 10), delay_s=0.2)
    url, _, _ = serve_app(["--concurrency", "1", "--moderation", "off", "--rate-limit", "0"], engines={"Rec": engine})
    first, second, third = (Client(url, verbose=False) for _ in range(3))
    chat(second, "warm-up so that the second visitor can regenerate")

    running = first.submit("a long question", "Rec", SYSTEM, 0.7, 1.0, 64, api_name="/chat")
    wait_for(lambda: engine.active == 1 and len(engine.received) == 2, what="the first reply to start")
    regen = second.submit("Rec", SYSTEM, 0.7, 1.0, 64, api_name="/regenerate")
    wait_for(lambda: regen.status().code == Status.IN_QUEUE, what="/regenerate to be queued")
    queued = third.submit("another question", "Rec", SYSTEM, 0.7, 1.0, 64, api_name="/chat")
    wait_for(lambda: queued.status().code == Status.IN_QUEUE and queued.status().rank is not None,
             what="/chat to be queued")

    assert (regen.status().rank, queued.status().rank) == (0, 1)  # the same pool, in arrival order
    assert queued.status().queue_size >= 2
    assert engine.active == 1
    for job in (running, regen, queued):
        job.result(timeout=60)
    assert engine.peak == 1 and len(engine.received) == 4


def test_concurrency_lets_that_many_replies_stream_together(serve_app):
    engine = PeakEngine("Rec", reply=" ".join(["word"] * 10), delay_s=0.2)
    url, _, _ = serve_app(["--concurrency", "2", "--moderation", "off", "--rate-limit", "0"], engines={"Rec": engine})

    jobs = [Client(url, verbose=False).submit(f"question {i}", "Rec", SYSTEM, 0.7, 1.0, 64, api_name="/chat")
            for i in range(3)]
    for job in jobs:
        job.result(timeout=60)

    assert engine.peak == 2 and len(engine.received) == 3


# -- share link, auth, warnings ------------------------------------------------------------------------

def test_share_without_network_keeps_serving_locally_and_says_why(serve_app, capfd):
    engine = RecordingEngine("Rec")
    url, share_url, _ = serve_app(["--share"], engines={"Rec": engine},
                                  share_server_address=f"127.0.0.1:{closed_port()}")
    printed = capfd.readouterr()

    assert share_url is None
    lines = [line for line in (printed.out + printed.err).splitlines() if line.startswith("Share link:")]
    assert len(lines) == 1 and url in lines[0] and "still serving locally" in lines[0]
    assert "content moderation is OFF" in printed.err and "no password" in printed.err  # the loud warnings
    assert httpx.get(url, timeout=10).status_code == 200
    replies, _ = chat(Client(url, verbose=False), "Hello")
    assert replies[-1].startswith("Hello from the recording engine.")


def test_sharing_warns_without_moderation_or_auth_and_not_with_both():
    shared = Settings(share=True)
    assert len(serving.startup_warnings(shared, moderation_on=False)) == 2
    assert len(serving.startup_warnings(Settings(share=True, auth=("a:b",)), moderation_on=False)) == 1
    assert "no password" in serving.startup_warnings(shared, moderation_on=True)[0]
    assert serving.startup_warnings(Settings(share=True, auth=("a:b",)), moderation_on=True) == []
    assert serving.startup_warnings(Settings(), moderation_on=False) == []  # local only: the banner is enough
    assert "Hugging Face Space" in serving.startup_warnings(Settings(), moderation_on=False, space=True)[0]


def test_auth_refuses_a_wrong_password_and_admits_the_right_one(serve_app, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# demo users\n\nbob:pa:ss:word\n")
    url, _, _ = serve_app(["--auth", "alice:pw1", "--auth", f"@{users}", "--moderation", "off"],
                          engines={"Rec": RecordingEngine("Rec")})

    refused = httpx.post(url + "login", data={"username": "alice", "password": "wrong"})
    assert refused.status_code == 400 and "Incorrect credentials" in refused.text
    assert httpx.get(url + "config").status_code == 401
    with httpx.Client() as browser:
        assert browser.post(url + "login", data={"username": "alice", "password": "pw1"}).status_code == 200
        assert browser.get(url + "config").status_code == 200
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=("alice", "pw2"), verbose=False)
    for user, password in (("alice", "pw1"), ("bob", "pa:ss:word")):
        replies, _ = chat(Client(url, auth=(user, password), verbose=False), "Hello")
        assert replies[-1].startswith("Hello from the recording engine.")


def test_auth_entries_and_files_parse_and_bad_ones_fail_without_echoing_the_password(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("dave:one\n# comment\n  erin:two:three  \n")
    assert serving.parse_auth(["zoe:pw", f"@{users}"]) == [("zoe", "pw"), ("dave", "one"), ("erin", "two:three")]
    for bad, expected in ((["hunter2"], "entry 1"), (["ok:pw", ":pw"], "entry 2"), (["zoe:"], "entry 1"),
                          (["a:x", "a:y"], "listed twice"), ([f"@{tmp_path / 'missing.txt'}"], "cannot read")):
        with pytest.raises(ConfigError, match=expected) as caught:
            serving.parse_auth(bad)
        assert "hunter2" not in str(caught.value) and ":pw" not in str(caught.value)


def test_a_bad_auth_flag_stops_the_app_before_loading_models(tmp_path, capsys):
    assert main(["--auth", "hunter2", "--log-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --auth entry 1: expected USER:PASSWORD") and "hunter2" not in err


# -- ZeroGPU -------------------------------------------------------------------------------------------

def spaces_standin() -> types.ModuleType:
    """A `spaces` module as ZeroGPU behaves for our purposes: `GPU` wraps a function; while a wrapped call runs,
    `active` > 0 (the GPU is attached); arguments and yielded values must pickle (they cross processes)."""
    module = types.ModuleType("spaces")
    module.calls, module.active = [], 0

    def GPU(task=None, *, duration=None, size=None):  # noqa: N802 - the real name
        if task is None:
            return functools.partial(GPU, duration=duration, size=size)
        assert inspect.isgeneratorfunction(task), "streaming GPU work must be a generator function"

        @functools.wraps(task)
        def attached(*args, **kwargs):
            pickle.dumps((args, kwargs))
            seconds = duration(*args, **kwargs) if callable(duration) else duration
            module.calls.append({"task": task.__name__, "duration": seconds, "args": args})
            module.active += 1
            try:
                for item in task(*args, **kwargs):
                    pickle.dumps(item)
                    yield item
            finally:
                module.active -= 1

        return attached

    module.GPU = GPU
    return module


@pytest.fixture
def zerogpu(monkeypatch):
    module = spaces_standin()
    monkeypatch.setitem(sys.modules, "spaces", module)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return module


def record_forwards(model, spaces):
    """Record, for every forward pass of ``model``, whether a spaces.GPU call was running."""
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(spaces.active > 0))
    return seen, handle


def test_spaces_is_used_only_on_zerogpu_hardware(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", spaces_standin())
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert zerogpu_engine.zerogpu_spaces() is None
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert zerogpu_engine.zerogpu_spaces() is sys.modules["spaces"]


def test_zerogpu_reply_runs_all_gpu_work_inside_one_spaces_gpu_call(zerogpu, tiny_llama_dir):
    from vicuna_demo.config import ModelSpec
    from vicuna_demo.engines.protocol import SamplingParams
    from vicuna_demo.loading import load_model

    loaded = load_model(ModelSpec(str(tiny_llama_dir), name="Tiny", device="cpu"))
    engine = start_engine(loaded, spaces=zerogpu_engine.zerogpu_spaces())
    assert isinstance(engine, zerogpu_engine.ZeroGPUEngine)
    seen, handle = record_forwards(loaded.model, zerogpu)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=6)
        prompt = engine.prepare([{"role": "user", "content": "Hello"}], params)
        stream = engine.stream(prompt, params)
        text = "".join(stream)
        again = "".join(engine.stream(prompt, params))
    finally:
        handle.remove()

    assert [c["duration"] for c in zerogpu.calls] == [zerogpu_engine.gpu_seconds(6)] * 2
    assert zerogpu.calls[0]["args"][0] == list(prompt.payload)
    assert seen and all(seen), "a forward pass ran outside spaces.GPU"
    assert stream.stats.n_tokens >= 1 and stream.stats.finish_reason in ("stop", "length")
    assert text == again  # greedy: the same reply each time
    assert zerogpu.active == 0


def test_zerogpu_reply_can_be_stopped_and_the_gpu_call_ends(zerogpu, tiny_llama_dir):
    from vicuna_demo.config import ModelSpec
    from vicuna_demo.engines.protocol import SamplingParams
    from vicuna_demo.loading import load_model

    loaded = load_model(ModelSpec(str(tiny_llama_dir), name="Tiny", device="cpu"))
    # a random model could end at once: make it run on (no end-of-sequence token for generate's own config, for
    # the GPU call or for the reply)
    loaded.model.generation_config.eos_token_id = None
    loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())
    engine = start_engine(loaded, spaces=zerogpu_engine.zerogpu_spaces())
    params = SamplingParams(temperature=0, max_new_tokens=400)
    stream = engine.stream(engine.prepare([{"role": "user", "content": "Count"}], params), params)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 3:
            stream.cancel()

    assert stream.stats.finish_reason == "cancelled"
    assert stream.stats.n_tokens < 400
    assert zerogpu.active == 0


@pytest.mark.parametrize("flags", [[], ["--no-warmup"]], ids=["default-flags", "no-warmup"])
def test_the_app_on_zerogpu_serves_replies_through_spaces_gpu(zerogpu, tiny_llama_dir, serve_app, flags):
    url, _, runtime = serve_app(["--model", f"{tiny_llama_dir},name=Tiny,device=cpu", *flags,
                                 "--moderation", "off", "--max-new-tokens", "16"])
    assert runtime.wait_ready(60)
    engine = runtime.service.engines["Tiny"].engine
    assert isinstance(engine, zerogpu_engine.ZeroGPUEngine) and engine.ready
    seen, handle = record_forwards(engine.model, zerogpu)
    try:
        chatbot, _box, notice = Client(url, verbose=False).predict(
            "Hello", "Tiny", engine.default_system, 0, 1.0, 16, api_name="/chat")
    finally:
        handle.remove()

    assert notice == "" and chatbot[-1]["role"] == "assistant"
    assert len(zerogpu.calls) == 1 and seen and all(seen)
    (row,) = runtime.store.turns()
    assert row.model == "Tiny" and row.finish_reason in ("stop", "length") and row.n_tokens >= 1


SPACES_STANDIN = """
import functools, inspect, pickle
calls = []

def GPU(task=None, *, duration=None, size=None):
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    assert inspect.isgeneratorfunction(task)

    @functools.wraps(task)
    def attached(*args, **kwargs):
        pickle.dumps((args, kwargs))
        calls.append(task.__name__)
        for item in task(*args, **kwargs):
            pickle.dumps(item)
            yield item
    return attached
"""


@pytest.mark.slow
def test_python_app_py_starts_on_zerogpu_with_default_flags(tmp_path, tiny_llama_dir):
    """`python app.py` as a ZeroGPU Space runs it: SPACES_ZERO_GPU set, a `spaces` module importable, warm-up
    on (the default). It serves the page, the model is ready, and nothing is printed as a traceback."""
    (tmp_path / "standin").mkdir()
    (tmp_path / "standin" / "spaces.py").write_text(SPACES_STANDIN)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICUNA_DEMO_") and k != "OPENAI_API_KEY"}
    env.update(SPACES_ZERO_GPU="true", PYTHONPATH=str(tmp_path / "standin"), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", f"{tiny_llama_dir},name=Tiny,device=cpu",
                                 "--port", str(port), "--log-dir", str(tmp_path / "logs"), "--moderation", "off"],
                                cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "Tiny: ready" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.5)
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
            assert proc.poll() is None
        finally:
            stop_app(proc)
    output = log_path.read_text()
    assert "Traceback" not in output and "TypeError" not in output, output
    assert "ZeroGPU" in output


# -- pushing logs to a Hub dataset ---------------------------------------------------------------------

def test_unreachable_hub_leaves_the_app_working_with_one_warning(serve_app, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="vicuna_demo.publish")
    token = "hf_QbX3kLmN0pRsTuVwXyZ1234567890abcd"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    engine = RecordingEngine("Rec")
    url, _, runtime = serve_app(["--hf-dataset", "someone/demo-logs", "--hf-push-minutes", "0.005",
                                 "--moderation", "off"], engines={"Rec": engine}, environ={})

    wait_for(lambda: runtime.pusher.failing, what="the first push to fail")
    replies, notice = chat(Client(url, verbose=False), "Hello")
    wait_for(lambda: sum("failed again" in r.getMessage() for r in caplog.records) >= 2, what="retries")

    assert notice == "" and replies[-1].startswith("Hello from the recording engine.")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "someone/demo-logs" in warnings[0] and "keeps working" in warnings[0]
    assert all(token not in r.getMessage() for r in caplog.records)
    assert len(runtime.store.turns()) == 1


def test_dataset_push_uploads_a_consistent_snapshot_of_the_store(tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl
    from vicuna_demo.data.storage import Store, TurnRecord

    class RecordingHfApi(HfApi):
        def __init__(self):
            super().__init__(endpoint=f"http://127.0.0.1:{closed_port()}", token="hf_unused")
            self.repos, self.commits = [], []

        def create_repo(self, repo_id, **kwargs):
            self.repos.append((repo_id, kwargs))
            return RepoUrl(f"{self.endpoint}/datasets/{repo_id}", endpoint=self.endpoint)

        def create_commit(self, repo_id, operations, **kwargs):
            files = {}
            for op in operations:
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
            self.commits.append(files)

    def turn(i):
        return TurnRecord(conversation_id=f"c{i}", turn_index=1, tstamp=time.time(), client_hash="h", model="Rec",
                          template="t", params={}, messages=[{"role": "user", "content": f"q{i}"}], reply="a",
                          finish_reason="stop", n_tokens=1, ttft_s=0.1, tok_s=10.0, moderation="off",
                          moderation_categories=())

    def rows(blob):
        path = tmp_path / f"pushed-{time.monotonic_ns()}.sqlite3"
        path.write_bytes(blob)
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM turns").fetchone()[0]

    log_dir = tmp_path / "logs"
    store = Store(log_dir)
    store.log_turn(turn(1))
    store.log_turn(turn(2))
    api = RecordingHfApi()
    pusher = publish.DatasetPush("someone/demo-logs", log_dir, every_min=60, hf_api=api).start()
    try:
        wait_for(lambda: pusher.scheduler is not None and len(api.commits) == 1, what="the first push")
        (files,) = api.commits
        name = f"logs/{(log_dir / 'hf-push-id').read_text().strip()}/vicuna_demo.sqlite3"
        assert list(files) == [name] and rows(files[name]) == 2  # no salt, no -wal/-shm files
        assert api.repos == [("someone/demo-logs", {"private": True, "repo_type": "dataset", "exist_ok": True})]

        pusher.scheduler.trigger().result(timeout=20)
        assert len(api.commits) == 1  # nothing new: nothing uploaded
        store.log_turn(turn(3))
        pusher.scheduler.trigger().result(timeout=20)
        assert len(api.commits) == 2 and rows(api.commits[1][name]) == 3
    finally:
        pusher.close()
        store.close()
    assert f"logs/{publish.run_id(log_dir)}/vicuna_demo.sqlite3" == name  # the same folder name on restart
