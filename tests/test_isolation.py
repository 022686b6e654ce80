"""Visitors are isolated from each other: several gradio_client visitors chat with the real app at the same
time, interleaved, each with its own system prompt and sliders, and none ever sees another's history or
settings, in what comes back to it, in what reaches the model, or in the log; one visitor's Stop or Clear
touches no one else. The log keeps salted hashes of client addresses, never a raw IP or an API key."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time

import pytest
from gradio_client import Client

from tests.chat_client import chat, submit_chat, text_of
from tests.engines import RecordingEngine, ScriptedReply
from tests.fake_moderation_server import fake_moderation_server_factory  # noqa: F401 - fixture

MODEL = "Echo"


class EchoEngine(RecordingEngine):
    """Replies 'Echo: <last user message>' and records the sampling parameters of every request."""

    def __init__(self, delay_s=0.02):
        super().__init__(name=MODEL, delay_s=delay_s)
        self.params: list = []

    def stream(self, prompt, params):
        with self._lock:
            self.received.append([dict(m) for m in prompt.payload])
            self.params.append(params)
        words = f"Echo: {prompt.payload[-1]['content']}".split(" ")
        return ScriptedReply([w + " " for w in words[:-1]] + words[-1:], self.delay_s)


VISITORS = [  # secret word, system prompt, temperature, top_p, max tokens
    dict(word=f"zebra{i}", system=f"You serve visitor number {i}.", temperature=t, top_p=p, max_tokens=m)
    for i, (t, p, m) in enumerate([(0.0, 0.2, 16), (0.3, 0.5, 32), (0.6, 0.8, 48), (0.9, 1.0, 64)])
]


def words_in(text: str) -> set[str]:
    return set(re.findall(r"zebra\d", text))


def test_interleaved_visitors_never_see_each_others_history_or_parameters(launch_app):
    engine = EchoEngine()
    url, runtime = launch_app(["--rate-limit", "0", "--moderation", "off"], engines={MODEL: engine})
    clients = [Client(url, verbose=False) for _ in VISITORS]
    rounds = 3
    for r in range(rounds):
        jobs = [submit_chat(c, f"{v['word']} message {r}", MODEL, system=v["system"], temperature=v["temperature"],
                            top_p=v["top_p"], max_tokens=v["max_tokens"]) for c, v in zip(clients, VISITORS)]
        for v, job in zip(VISITORS, jobs):
            chatbot, _, notice = job.result(timeout=60)
            assert notice == ""
            assert [text_of(m) for m in chatbot if m["role"] == "user"] == [
                f"{v['word']} message {k}" for k in range(r + 1)]
            assert words_in(" ".join(text_of(m) for m in chatbot)) == {v["word"]}

    assert len(engine.received) == rounds * len(VISITORS)
    for messages, params in zip(engine.received, engine.params):
        owner = next(v for v in VISITORS if messages[0] == {"role": "system", "content": v["system"]})
        assert words_in(" ".join(m["content"] for m in messages)) == {owner["word"]}
        assert (params.temperature, params.top_p, params.max_new_tokens) == (
            owner["temperature"], owner["top_p"], owner["max_tokens"])

    by_conversation: dict[str, list] = {}
    for turn in runtime.store.turns():
        by_conversation.setdefault(turn.conversation_id, []).append(turn)
    assert len(by_conversation) == len(VISITORS)
    for turns in by_conversation.values():
        owner = next(v for v in VISITORS if turns[0].messages[0]["content"] == v["system"])
        assert [t.turn_index for t in turns] == list(range(1, rounds + 1))
        for turn in turns:
            assert words_in(" ".join(m["content"] for m in turn.messages) + turn.reply) == {owner["word"]}
            assert turn.params == {"temperature": owner["temperature"], "top_p": owner["top_p"],
                                   "max_new_tokens": owner["max_tokens"]}


def test_one_visitors_stop_and_clear_leave_another_visitors_reply_and_history_alone(launch_app):
    engine = EchoEngine(delay_s=0.15)
    url, _ = launch_app(["--rate-limit", "0", "--moderation", "off"], engines={MODEL: engine})
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    chat(alice, "zebra1 first", MODEL)
    chat(bob, "zebra2 first", MODEL)
    long = "zebra1 " + " ".join(f"w{i}" for i in range(12))
    alice_job = submit_chat(alice, long, MODEL)
    bob_job = submit_chat(bob, "zebra2 " + " ".join(f"w{i}" for i in range(12)), MODEL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(bob_job.outputs()) < 3:  # bob's reply is streaming
        time.sleep(0.05)
    bob.predict(api_name="/stop")
    bob.predict(api_name="/clear")
    alice_chatbot, _, _ = alice_job.result(timeout=60)
    reply = text_of(alice_chatbot[-1])
    assert reply.startswith(f"Echo: {long}"), reply  # complete: Bob's Stop did not cut Alice's reply
    assert "stopped" not in reply
    assert len(alice_chatbot) == 4  # Bob's Clear did not clear Alice's history
    bob_chatbot, _, _ = bob_job.result(timeout=60)
    assert "stopped" in text_of(bob_chatbot[-1])  # Bob's Stop did stop Bob's reply
    after = chat(bob, "zebra2 again", MODEL)
    assert after.users == ["zebra2 again"]  # Bob's own Clear did clear his


KEY = "sk-isolation-SECRET-0123456789abcdef"
ADDRESSES = ("203.0.113.7", "198.51.100.23")


def test_the_log_holds_salted_client_hashes_never_raw_addresses_or_the_api_key(
        launch_app, tmp_path, monkeypatch, fake_moderation_server_factory, caplog):  # noqa: F811
    server = fake_moderation_server_factory(expected_api_key=KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    log_dir = tmp_path / "store"
    engine = EchoEngine(delay_s=0.0)
    url, runtime = launch_app(["--rate-limit", "0", "--moderation", "openai", "--log-dir", str(log_dir)],
                              engines={MODEL: engine})
    assert runtime.service.moderator.enabled
    # no proxy is trusted (--forwarded-allow-ips unset): a header naming another address changes nothing
    visitors = [Client(url, verbose=False, headers={"X-Forwarded-For": ip}) for ip in ADDRESSES]
    visitors.append(Client(url, verbose=False))  # direct, from 127.0.0.1
    for i, client in enumerate(visitors):
        for turn in range(2):
            assert chat(client, f"hello {i}.{turn}", MODEL).notice == ""
    assert server.request_count >= 6 and all(r.authorization == f"Bearer {KEY}" for r in server.requests)

    turns = runtime.store.turns()
    assert len(turns) == 6
    hashes = [t.client_hash for t in turns]
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    assert set(hashes) == {runtime.store.client_hash("127.0.0.1")}  # the TCP peer's address, hashed ...
    assert hashes[0] != hashlib.sha256(b"127.0.0.1").hexdigest()      # ... with a secret salt, not a plain digest

    runtime.store.close()  # flush the WAL into the database file, then read every byte the log keeps
    with sqlite3.connect(log_dir / "vicuna_demo.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        dump = "\n".join(db.iterdump())
    raw = b"".join(p.read_bytes() for p in log_dir.iterdir() if p.is_file())
    for secret in (*ADDRESSES, "127.0.0.1", KEY):
        assert secret not in dump
        assert secret.encode() not in raw
    assert KEY not in caplog.text
