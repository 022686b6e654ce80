"""Who the visitor is: the TCP peer unless a trusted proxy (--forwarded-allow-ips) names them in X-Forwarded-For.

Unit tests of the rules (vicuna_demo/services/identity.py), then the real app driven through gradio_client
with lying headers past --rate-limit: no spoofed form buys another message or another identity.
"""

from __future__ import annotations

import contextlib

import pytest
from gradio_client import Client

from tests.chat_client import chat
from tests.engines import RecordingEngine
from vicuna_demo.config import ConfigError, Settings
from vicuna_demo.serving import trusted_proxies
from vicuna_demo.services.identity import SPACE_PROXIES, TrustedProxies, client_address

NONE = TrustedProxies.parse("")
LOCAL = TrustedProxies.parse("127.0.0.1, ::1")
SPACE = TrustedProxies.parse(SPACE_PROXIES)
EVERY = TrustedProxies.parse("*")
REAL = "203.0.113.9"


@pytest.mark.parametrize(("peer", "headers", "trusted", "expected"), [
    # no proxy configured: the header is ignored, whatever it says
    ("198.51.100.4", ["1.2.3.4"], NONE, "198.51.100.4"),
    ("127.0.0.1", ["1.2.3.4"], NONE, "127.0.0.1"),
    ("10.0.0.7", ["1.2.3.4"], NONE, "10.0.0.7"),  # a private peer is not a proxy unless listed
    # an untrusted peer cannot use the header either
    ("198.51.100.4", ["1.2.3.4"], LOCAL, "198.51.100.4"),
    # a trusted proxy: the right-most entry that is not a proxy
    ("127.0.0.1", [REAL], LOCAL, REAL),
    ("127.0.0.1", [f"6.6.6.6, {REAL}"], LOCAL, REAL),  # what a proxy makes of a spoofed header
    ("10.16.3.80", [f"6.6.6.6, {REAL}, 10.16.3.1"], SPACE, REAL),  # through two proxies of the Space
    ("127.0.0.1", ["6.6.6.6", REAL], LOCAL, REAL),  # two headers read as one list, in order
    ("127.0.0.1", [f"{REAL}:51234"], LOCAL, REAL),  # a port is dropped
    # garbage never becomes an identity: the walk stops at the last believable hop
    ("127.0.0.1", ["not-an-ip"], LOCAL, "127.0.0.1"),
    ("127.0.0.1", [f"{REAL}, garbage"], LOCAL, "127.0.0.1"),
    ("127.0.0.1", [f"garbage, {REAL}"], LOCAL, REAL),
    ("127.0.0.1", ["", " , "], LOCAL, "127.0.0.1"),
    ("10.1.1.1", ["unknown, 10.2.2.2"], SPACE, "10.2.2.2"),
    # every hop trusted: the left-most proxy address (the visitor is inside the trusted network)
    ("127.0.0.1", ["127.0.0.2"], LOCAL, "127.0.0.2"),
    # * trusts every peer, and then takes the right-most entry (uvicorn takes the left-most: the visitor's pick)
    ("198.51.100.4", [f"6.6.6.6, {REAL}"], EVERY, REAL),
    # IPv6: normalised, bracketed with a port, IPv4-mapped, and one /64 per visitor
    ("::1", ["[2001:db8:1:2::99]:443"], LOCAL, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:aaaa::1", ["1.2.3.4"], LOCAL, "2001:db8:1:2::/64"),
    ("2001:0db8:0001:0002:0000:0000:0000:0001", [], NONE, "2001:db8:1:2::/64"),
    ("::ffff:127.0.0.1", [REAL], LOCAL, REAL),
    ("127.0.0.1", [f"::ffff:{REAL}"], LOCAL, REAL),
    # no usable peer at all
    (None, ["1.2.3.4"], EVERY, "unknown"),
    ("testclient", ["1.2.3.4"], LOCAL, "testclient"),
])
def test_client_address_rules(peer, headers, trusted, expected):
    assert client_address(peer, headers, trusted) == expected


def test_spoofed_prefixes_all_map_to_the_one_real_visitor():
    seen = {client_address("127.0.0.1", [f"{spoof}, {REAL}"], LOCAL)
            for spoof in ("1.1.1.1", "2001:db8::1", "x", "10.0.0.1", "", "1.1.1.1, 2.2.2.2")}
    assert seen == {REAL}


@pytest.mark.parametrize("spec", ["1.2.3", "10.0.0.0/33", "localhost", "127.0.0.1, nope"])
def test_a_bad_forwarded_allow_ips_is_a_config_error_naming_the_entry(spec):
    with pytest.raises(ConfigError, match="--forwarded-allow-ips: '.*' is not an IP address or network"):
        trusted_proxies(Settings(forwarded_allow_ips=spec))


def test_on_a_space_the_default_trusts_the_private_network_and_elsewhere_nobody():
    assert trusted_proxies(Settings(), space=True) == SPACE
    assert not trusted_proxies(Settings(), space=False)
    assert not trusted_proxies(Settings(forwarded_allow_ips=""), space=True)  # '' overrides the Space default
    assert trusted_proxies(Settings(forwarded_allow_ips="*")).everyone


# -- the real app -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def served(argv, tmp_path):
    """The app as ``python app.py`` serves it (serve(): launch_kwargs, middleware), on a free local port."""
    from app import create_app, serve
    from vicuna_demo.config import load_settings
    settings = load_settings([*argv, "--moderation", "off", "--log-dir", str(tmp_path / "logs")], environ={})
    engine = RecordingEngine(name="Rec", delay_s=0.0)
    demo, runtime = create_app(settings, engines={"Rec": engine})
    url, _ = serve(demo, runtime, settings, block=False, server_name="127.0.0.1", server_port=None)
    try:
        yield url, runtime, engine
    finally:
        demo.close()
        runtime.service.store.close()


SPOOFED = ({"X-Forwarded-For": "1.2.3.4"}, {"X-Forwarded-For": f"6.6.6.6, {REAL}"},
           {"X-Forwarded-For": "2001:db8::7"}, {"X-Forwarded-For": "garbage"},
           {"X-Forwarded-For": "127.0.0.2"}, {"x-forwarded-for": "198.51.100.1, 198.51.100.2"},
           {"X-Forwarded-For": "[::1]:80"}, {"X-Real-IP": "5.5.5.5", "Forwarded": "for=5.5.5.5"})


def too_fast(result) -> bool:
    return "too fast" in result.notice


def test_spoofed_headers_do_not_reset_the_rate_limit_without_a_proxy(tmp_path):
    with served(["--rate-limit", "3"], tmp_path) as (url, runtime, engine):
        first = Client(url, verbose=False)
        for i in range(3):
            assert not too_fast(chat(first, f"hello {i}", "Rec"))
        for headers in SPOOFED:
            result = chat(Client(url, verbose=False, headers=headers), "one more", "Rec")
            assert too_fast(result), headers
        assert len(engine.received) == 3
        assert {t.client_hash for t in runtime.store.turns()} == {runtime.store.client_hash("127.0.0.1")}


def test_behind_a_trusted_proxy_the_real_address_is_limited_whatever_the_visitor_prepends(tmp_path):
    with served(["--rate-limit", "2", "--forwarded-allow-ips", "127.0.0.1,::1"], tmp_path) as (url, runtime, engine):
        # the proxy (this test, from 127.0.0.1) appends the real address after whatever the visitor sent
        def via_proxy(sent_by_visitor: str, real: str) -> Client:
            chain = f"{sent_by_visitor}, {real}" if sent_by_visitor else real
            return Client(url, verbose=False, headers={"X-Forwarded-For": chain})

        for i in range(2):
            assert not too_fast(chat(via_proxy("", REAL), f"hi {i}", "Rec"))
        for spoof in ("1.2.3.4", "1.2.3.4, 5.6.7.8", "garbage", "2001:db8::1", "127.0.0.1"):
            assert too_fast(chat(via_proxy(spoof, REAL), "again", "Rec")), spoof
        other = "198.51.100.77"  # another visitor behind the same proxy has a budget of their own
        assert not too_fast(chat(via_proxy("1.2.3.4", other), "hello", "Rec"))
        hashes = {t.client_hash for t in runtime.store.turns()}
        assert hashes == {runtime.store.client_hash(REAL), runtime.store.client_hash(other)}
        assert len(engine.received) == 3
