"""Tests for the `moderation` package, run against a real local HTTP fake of the OpenAI moderation
endpoint (tests/fake_moderation_server.py) through the real `openai` SDK. No network beyond
127.0.0.1. Run: .venv-test/bin/python -m pytest tests/test_moderation.py -q
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from moderation import (
    UNAVAILABLE_NOTICE,
    ModerationResult,
    Moderator,
    NoModerator,
    OpenAIModerator,
    create_moderator,
    parse_thresholds,
)
from moderation import scrub
from tests.fake_moderation_server import (  # noqa: F401  (the fixtures are used by name)
    FakeModerationServer,
    fake_moderation_server,
    fake_moderation_server_factory,
)

KEY = "sk-test-SECRET123"
NOISY_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "vicuna_demo.moderation")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_LOG", "OPENAI_CUSTOM_HEADERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(fake_moderation_server: FakeModerationServer) -> FakeModerationServer:  # noqa: F811
    return fake_moderation_server


def fast_moderator(server: FakeModerationServer, **overrides) -> OpenAIModerator:
    """A moderator against the fake with tiny backoff, so retry tests stay fast."""
    options = dict(api_key=KEY, base_url=server.base_url, timeout_s=2.0, backoff_s=0.01, max_backoff_s=0.05)
    options.update(overrides)
    return OpenAIModerator(**options)


def dead_base_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- verdicts -----------------------------------------------------------------------------------


def test_flagged_text_is_blocked_with_a_notice_naming_categories_and_no_scores(server, caplog):
    server.flag("I will hurt you", {"harassment": 0.91, "violence": 0.87})
    caplog.set_level(logging.INFO, logger="vicuna_demo.moderation")

    result = fast_moderator(server).check("I will hurt you tomorrow")

    assert result == ModerationResult(
        allowed=False,
        status="flagged",
        categories=("harassment", "violence"),
        notice="Your message was not sent: it was flagged by the content moderation check "
        "(harassment, violence). Please rephrase.",
    )
    assert "0.91" not in repr(result) and "0.87" not in repr(result)
    flagged_logs = [r for r in caplog.records if r.name == "vicuna_demo.moderation"]
    assert len(flagged_logs) == 1 and "harassment, violence" in flagged_logs[0].getMessage()
    assert "hurt" not in caplog.text  # the text is identified by a hash, never logged


def test_clean_text_passes_and_is_sent_unchanged(server):
    text = "  What is the capital of France?\nThanks! ünïcødé  "

    result = fast_moderator(server).check(text)

    assert result == ModerationResult(allowed=True, status="passed", categories=(), notice="")
    (request,) = server.requests
    assert request.path == "/v1/moderations"
    assert request.body == {"input": text, "model": "omni-moderation-latest"}


def test_configured_model_is_sent(server):
    fast_moderator(server, model="text-moderation-stable").check("hello")

    assert server.requests[0].body["model"] == "text-moderation-stable"


def test_threshold_flags_a_score_the_service_did_not_flag(server):
    server.set_scores({"sexual": 0.25, "violence": 0.1})

    strict = fast_moderator(server, thresholds={"sexual": 0.2, "violence": 0.5})
    default = fast_moderator(server)

    assert strict.check("borderline text") == ModerationResult.flagged(("sexual",))
    assert default.check("borderline text").status == "passed"


def test_threshold_above_the_score_does_not_flag(server):
    server.set_scores({"sexual": 0.15})

    assert fast_moderator(server, thresholds={"sexual": 0.2}).check("text").status == "passed"


def test_slash_categories_are_reported_by_their_api_names(server):
    server.flag("threat", ["harassment/threatening", "self-harm/intent"])

    result = fast_moderator(server).check("a threat")

    assert result.categories == ("harassment/threatening", "self-harm/intent")


def test_empty_text_is_allowed_without_calling_the_service(server):
    moderator = fast_moderator(server)

    assert moderator.check("").allowed and moderator.check("   \n").status == "passed"
    assert server.request_count == 0


def test_concurrent_checks_each_get_their_own_verdict(server):
    server.flag("BAD", ["hate"])
    moderator = fast_moderator(server)
    texts = [f"message {i} {'BAD' if i % 2 else 'fine'}" for i in range(24)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(moderator.check, texts))

    assert [r.status for r in results] == ["flagged" if i % 2 else "passed" for i in range(24)]
    assert server.request_count == 24


# -- retries, timeouts, failure policy ----------------------------------------------------------


def test_server_errors_are_retried_until_the_service_answers(server):
    server.fail_next(2, status=500)

    result = fast_moderator(server, max_retries=2).check("hello")

    assert result.status == "passed"
    assert server.request_count == 3
    assert [r.headers["x-stainless-retry-count"] for r in server.requests] == ["0", "1", "2"]


def test_rate_limited_requests_are_retried_without_waiting_the_servers_long_retry_after(server):
    server.fail_next(1, status=429, retry_after=60)

    started = time.monotonic()
    result = fast_moderator(server).check("hello")

    assert result.status == "passed" and server.request_count == 2
    assert time.monotonic() - started < 2.0


def test_dropped_connections_are_retried(server):
    server.drop_next(2)

    assert fast_moderator(server).check("hello").status == "passed"
    assert server.request_count == 3


def test_retries_stop_after_max_retries(server):
    server.fail_next(10, status=503)

    result = fast_moderator(server, max_retries=1).check("hello")

    assert result.status == "unavailable" and server.request_count == 2


def test_authentication_errors_are_not_retried(fake_moderation_server_factory):  # noqa: F811
    server = fake_moderation_server_factory(expected_api_key="sk-test-other")

    result = fast_moderator(server).check("hello")

    assert result.status == "unavailable" and not result.allowed
    assert server.request_count == 1


def test_a_server_that_never_answers_is_abandoned_within_the_timeout_bound(server):
    server.hang_next()
    moderator = fast_moderator(server, timeout_s=0.3, max_retries=1)
    assert moderator.max_wait_s == pytest.approx(2 * 0.3 + 1 * 0.05)

    started = time.monotonic()
    result = moderator.check("hello")
    elapsed = time.monotonic() - started

    assert result.status == "unavailable" and not result.allowed
    assert server.request_count == 2
    assert 0.6 <= elapsed < moderator.max_wait_s + 0.5


def test_default_bound_is_attempts_times_timeout_plus_capped_backoff(server):
    moderator = create_moderator("openai", api_key=KEY, base_url=server.base_url, timeout_s=5.0, max_retries=2)

    assert moderator.max_wait_s == pytest.approx(3 * 5.0 + 2 * 2.0)


def test_block_policy_refuses_text_when_the_service_keeps_failing(server):
    server.fail_next(10, status=500)

    result = fast_moderator(server, on_error="block").check("hello")

    assert result == ModerationResult(allowed=False, status="unavailable", categories=(), notice=UNAVAILABLE_NOTICE)
    assert result.notice == "The moderation service is unavailable right now, please retry in a moment."


def test_allow_policy_lets_text_through_and_logs_a_warning(server, caplog):
    server.fail_next(10, status=500)
    caplog.set_level(logging.WARNING, logger="vicuna_demo.moderation")

    result = fast_moderator(server, on_error="allow").check("hello")

    assert result.allowed and result.status == "unavailable" and result.notice == ""
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "vicuna_demo.moderation"]
    assert len(warnings) == 1 and "allowing it unchecked" in warnings[0].getMessage()


def test_unreachable_service_is_reported_unavailable_not_raised():
    moderator = OpenAIModerator(api_key=KEY, base_url=dead_base_url(), timeout_s=1.0, backoff_s=0.01, max_backoff_s=0.02)

    assert moderator.check("hello").status == "unavailable"


# -- construction, modes, endpoint --------------------------------------------------------------


def test_auto_mode_without_a_key_is_off_and_warns_exactly_once(caplog):
    caplog.set_level(logging.DEBUG)

    moderator = create_moderator("auto")

    assert isinstance(moderator, NoModerator) and moderator.enabled is False
    assert moderator.check("anything") == ModerationResult(allowed=True, status="off", categories=(), notice="")
    assert moderator.describe() == "Moderation is OFF: messages are not checked."
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "OPENAI_API_KEY" in warnings[0].getMessage()


def test_auto_mode_uses_openai_with_the_key_and_endpoint_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)

    moderator = create_moderator("auto")

    assert isinstance(moderator, OpenAIModerator) and moderator.enabled
    assert moderator.check("hello").status == "passed"
    assert server.requests[0].authorization == f"Bearer {KEY}"


def test_openai_mode_without_a_key_raises_naming_OPENAI_API_KEY():
    with pytest.raises(ValueError, match="OPENAI_API_KEY") as excinfo:
        create_moderator("openai")
    assert "--moderation off" in str(excinfo.value)


def test_off_mode_never_contacts_the_service(server):
    moderator = create_moderator("off", api_key=KEY, base_url=server.base_url)

    assert moderator.check("anything").status == "off"
    assert server.request_count == 0


def test_unknown_mode_and_policy_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        create_moderator("sometimes")
    with pytest.raises(ValueError, match="on_error"):
        create_moderator("openai", api_key=KEY, on_error="maybe")


def test_base_url_is_taken_from_OPENAI_BASE_URL(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)

    assert create_moderator("openai", api_key=KEY).check("hello").status == "passed"
    assert server.request_count == 1


def test_explicit_base_url_wins_over_OPENAI_BASE_URL(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", dead_base_url())

    assert create_moderator("openai", api_key=KEY, base_url=server.base_url).check("hello").status == "passed"
    assert server.request_count == 1


def test_moderators_satisfy_the_interface(server):
    for moderator in (NoModerator(), fast_moderator(server)):
        assert isinstance(moderator, Moderator)


def test_describe_names_model_policy_and_thresholds(server):
    assert fast_moderator(server).describe() == "Moderation: OpenAI omni-moderation-latest (on error: block)"
    assert (
        fast_moderator(server, on_error="allow", thresholds={"sexual": 0.2}).describe()
        == "Moderation: OpenAI omni-moderation-latest (on error: allow; thresholds: sexual>=0.2)"
    )


# -- thresholds ---------------------------------------------------------------------------------


def test_parse_thresholds_reads_category_score_pairs():
    assert parse_thresholds("sexual=0.2, violence=0.5,self-harm/intent=1") == {
        "sexual": 0.2,
        "violence": 0.5,
        "self-harm/intent": 1.0,
    }
    assert parse_thresholds("") == {}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sexual", "CATEGORY=SCORE"),
        ("=0.2", "CATEGORY=SCORE"),
        ("sexual=", "CATEGORY=SCORE"),
        ("sexual=high", "not a number"),
        ("sexuall=0.2", "Unknown moderation category"),
        ("sexual=1.5", r"\(0, 1\]"),
        ("sexual=0", r"\(0, 1\]"),
        ("sexual=nan", r"\(0, 1\]"),
        ("sexual=0.2,sexual=0.3", "twice"),
    ],
)
def test_parse_thresholds_rejects_bad_input_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_thresholds(spec)


def test_unknown_threshold_category_is_rejected_at_construction():
    with pytest.raises(ValueError, match="Unknown moderation category"):
        create_moderator("openai", api_key=KEY, thresholds={"violent": 0.3})


# -- the API key stays secret -------------------------------------------------------------------


def test_api_key_never_appears_in_logs_results_notices_or_descriptions(server, caplog):
    caplog.set_level(logging.DEBUG)
    for name in NOISY_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    server.flag("nasty", ["harassment"])
    seen: list[str] = []

    for on_error in ("block", "allow"):
        moderator = fast_moderator(server, on_error=on_error, timeout_s=0.3, max_retries=1)
        seen += [moderator.describe(), repr(moderator)]
        server.fail_next(2, status=500, echo_authorization=True)  # a proxy echoing the header
        seen.append(repr(moderator.check("hello")))
        server.fail_next(2, status=429, echo_authorization=True, message=f"limit for key {KEY}")
        seen.append(repr(moderator.check("hello")))
        seen.append(repr(moderator.check("something nasty")))
        server.hang_next(2)
        seen.append(repr(moderator.check("hello")))
        server.release()
    with FakeModerationServer(expected_api_key="sk-other") as strict:
        seen.append(repr(fast_moderator(strict).check("hello")))
    seen.append(repr(OpenAIModerator(api_key=KEY, base_url=dead_base_url(), max_retries=0).check("hello")))
    seen.append(create_moderator("openai", api_key=KEY, base_url=server.base_url).describe())

    assert any("[redacted]" in r.getMessage() for r in caplog.records)  # the echoed key was seen and scrubbed
    everything = "\n".join(seen + [caplog.text] + [r.getMessage() for r in caplog.records])
    assert "SECRET123" not in everything


def test_scrub_removes_keys_and_bearer_tokens():
    text = f"Authorization: Bearer {KEY}; api_key={KEY}; other sk-proj-abcdefgh1234"

    cleaned = scrub(text, (KEY,))

    assert "SECRET123" not in cleaned and "abcdefgh1234" not in cleaned


# -- the fake server itself ---------------------------------------------------------------------


def test_fake_server_speaks_the_sdks_response_schema_for_string_and_list_inputs(server):
    server.flag("bad", {"sexual/minors": 0.7})
    client = openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0, _strict_response_validation=True)

    one = client.moderations.create(input="fine", model="omni-moderation-latest")
    many = client.moderations.create(input=["fine", "bad"], model="omni-moderation-latest")

    assert one.model == "omni-moderation-latest" and one.id.startswith("modr-")
    assert [r.flagged for r in many.results] == [False, True]
    assert many.results[1].categories.sexual_minors and many.results[1].category_scores.sexual_minors == 0.7
    assert server.requests[1].inputs == ["fine", "bad"]
    assert server.requests[0].authorization == f"Bearer {KEY}"
