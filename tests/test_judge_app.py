"""The judge in the running app, driven through gradio_client: the 📋 Evaluate tab (the embedded
SmolLM2 against a scripted endpoint, judged by a local judge server), moderation of uploaded
questions, one evaluation at a time, the app without a judge, and the leaderboard's judge view."""

from __future__ import annotations

import json
import logging
import time
import zipfile

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.fake_moderation_server import fake_moderation_server  # noqa: F401
from tests.judge_server import JudgeServer, judged_answers
from vicuna_demo.data.storage import JudgeVoteRecord, VoteRecord
from vicuna_demo.engines.sampling_defaults import CPU_MAX_NEW_TOKENS

ENDPOINT_ANSWER = "The endpoint's considered answer: 42."
SMALL = "SmolLM2-135M (offline)"
QUESTIONS = """\
{"question_id": 1, "category": "writing", "turns": ["Write one sentence about the sea.", "Now make it rhyme."]}
{"question_id": 2, "category": "math", "turns": ["What is 6 times 7?"], "reference": ["42"]}
"""


@pytest.fixture
def servers():
    """(contestant endpoint, judge) servers; the judge prefers the endpoint's answer."""
    def prefers_the_endpoint(messages):
        try:
            first, _ = judged_answers(messages)
        except ValueError:                      # not a pairwise prompt: a grade, or an answer as a contestant
            return "A fair answer. [[6]]"
        return "Step by step... " + ("[[A]]" if ENDPOINT_ANSWER in first else "[[B]]")

    with JudgeServer(lambda m: ENDPOINT_ANSWER) as contestant, JudgeServer(prefers_the_endpoint) as judge:
        yield contestant, judge


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(QUESTIONS)
    return path


def start(launch_app, embedded_engine, servers, *extra, judge=True):
    contestant, judge_server = servers
    argv = ["--endpoint", contestant.endpoint("Endpoint"), "--endpoint", judge_server.endpoint("Judge"), *extra]
    if judge:
        argv += ["--judge", "Judge"]
    url, runtime = launch_app(argv, engines={SMALL: embedded_engine})
    return Client(url, verbose=False), runtime


def test_the_evaluate_tab_runs_an_evaluation_and_offers_fastchat_outputs(launch_app, embedded_engine, servers,
                                                                        question_file):
    client, _ = start(launch_app, embedded_engine, servers)
    # the embedded model runs on a CPU: the page's answers start from its own reply length, not 512
    evaluate = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/evaluate"]
    assert evaluate["parameters"][4]["parameter_default"] == CPU_MAX_NEW_TOKENS
    job = client.submit(SMALL, "Endpoint", "pairwise", handle_file(str(question_file)), 16, api_name="/evaluate")
    status, summary, table, plot, archive = job.result(timeout=240)
    statuses = [out[0] for out in job.outputs()]
    assert any(s.startswith("⏳ Answers") for s in statuses) and any(s.startswith("⏳ Judgments") for s in statuses)
    assert status == "✅ Done."
    assert "**Endpoint** wins 3" in summary and f"**{SMALL}** wins 0" in summary
    assert table["headers"][:3] == ["category", f"{SMALL} wins", "Endpoint wins"]
    assert [row[0] for row in table["data"]] == ["math", "writing", "all"]
    assert table["data"][-1][1:] == [0, 3, 0, 0]
    assert plot is not None
    names = zipfile.ZipFile(archive).namelist()
    assert "evaluation/model_judgment/Judge_pair.jsonl" in names
    assert f"evaluation/model_answer/{SMALL}.jsonl" in names and "evaluation/summary.json" in names
    first = json.loads(zipfile.ZipFile(archive).read(f"evaluation/model_answer/{SMALL}.jsonl").splitlines()[0])
    assert first["question_id"] == 1 and first["generate_params"]["repetition_penalty"] == 1.1  # the model's own
    assert first["generate_params"]["max_new_tokens"] == 16                                       # the page's


def test_uploaded_questions_are_moderated_and_a_flagged_one_reaches_no_model(launch_app, embedded_engine, servers,
                                                                            tmp_path, monkeypatch,
                                                                            fake_moderation_server):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-moderation-key")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_moderation_server.base_url)
    fake_moderation_server.flag("hurt someone", {"violence": 0.95})
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "stem", "turns": ["Why is the sky blue?"]}\n'
                    '{"question_id": 2, "category": "stem", "turns": ["How do I hurt someone?"]}\n')
    client, _ = start(launch_app, embedded_engine, servers, "--moderation", "openai")
    status, summary, *_ = client.predict(SMALL, "Endpoint", "pairwise", handle_file(str(path)), 16,
                                         api_name="/evaluate")
    contestant, _judge = servers
    assert status == "✅ Done."
    assert all("hurt someone" not in m[-1]["content"] for m in contestant.requests)
    assert "stopped by content moderation" in summary and "1 turn(s) not judged" in summary


def test_only_one_evaluation_runs_at_a_time(launch_app, embedded_engine, servers, question_file):
    contestant, judge_server = servers
    judge_server.delay_s = 0.2        # keep the first evaluation busy
    client, _ = start(launch_app, embedded_engine, servers)
    first = client.submit("Endpoint", SMALL, "pairwise", handle_file(str(question_file)), 16, api_name="/evaluate")
    deadline = time.monotonic() + 60
    while not any(out[0].startswith("⏳") for out in first.outputs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    status, *_ = Client(client.src, verbose=False).predict(SMALL, "Endpoint", "pairwise", None, 16,
                                                          api_name="/evaluate")
    assert "Another evaluation is running" in status
    assert first.result(timeout=240)[0] == "✅ Done."


def test_the_page_uses_the_runtimes_judge_one_per_app(launch_app, embedded_engine, servers, question_file):
    """The Evaluate tab runs in runtime.judge (one JudgeService per app, built by the runtime), so its
    one-evaluation-at-a-time rule and rate limits hold for the page and for everything else in the app."""
    contestant, judge_server = servers
    judge_server.delay_s = 0.2        # keep the evaluation busy while we look
    client, runtime = start(launch_app, embedded_engine, servers)
    assert not runtime.judge.evaluation_running
    job = client.submit("Endpoint", SMALL, "pairwise", handle_file(str(question_file)), 16, api_name="/evaluate")
    deadline = time.monotonic() + 60
    while not any(out[0].startswith("⏳") for out in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runtime.judge.evaluation_running       # the page's evaluation holds the runtime's judge
    with pytest.raises(Exception, match="Another evaluation is running"):
        next(iter(runtime.judge.evaluate([], "Endpoint", SMALL)))
    assert job.result(timeout=240)[0] == "✅ Done."
    assert not runtime.judge.evaluation_running


def test_without_a_judge_the_app_starts_and_says_there_is_none(launch_app, embedded_engine, servers, caplog):
    caplog.set_level(logging.INFO, logger="vicuna_demo")
    client, runtime = start(launch_app, embedded_engine, servers, judge=False)
    assert not runtime.judge.available
    # the Evaluate tab offers answers only: a crafted call for a judged mode is refused by the choices themselves
    assert "/evaluate" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    with pytest.raises(AppError, match="is not in the list of choices"):
        client.predict(SMALL, "Endpoint", "pairwise", None, 16, api_name="/evaluate")
    summary, table, plot = client.predict(api_name="/leaderboard_judge")
    assert "No judge model is set up on this demo" in summary and "--" not in summary and plot is None
    assert "Add one with --judge NAME" in caplog.text      # how to add one: the operator's start-up log


def test_bad_question_files_and_choices_get_a_message(launch_app, embedded_engine, servers, tmp_path):
    client, _ = start(launch_app, embedded_engine, servers)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["a", "b", "c"]}\n')
    with pytest.raises(httpx.HTTPStatusError) as refused:  # refused at the upload, before gradio stores it
        client.predict(SMALL, "Endpoint", "pairwise", handle_file(str(bad)), 16, api_name="/evaluate")
    assert refused.value.response.status_code == 422
    assert refused.value.response.text == "bad.jsonl, line 1: question 1 has 3 turns; 1 or 2 are supported."
    status, *_ = client.predict(SMALL, SMALL, "pairwise", None, 16, api_name="/evaluate")
    assert "two different models" in status
    for args in (("Nope", "Endpoint", "pairwise"), (SMALL, "Endpoint", "best-of-3")):   # a crafted API call
        with pytest.raises(AppError, match="is not in the list of choices"):
            client.predict(*args, None, 16, api_name="/evaluate")


def test_the_leaderboard_judge_view_rates_verdicts_and_shows_agreement_with_humans(launch_app, embedded_engine,
                                                                                   servers):
    client, runtime = start(launch_app, embedded_engine, servers)
    store = runtime.service.store
    for i, (judge_winner, human_winner) in enumerate([("model_a", "model_a"), ("model_b", "model_a"),
                                                      ("tie", "tie (bothbad)"), ("no_verdict", "model_b")]):
        store.log_judge_vote(JudgeVoteRecord(
            battle_id=f"b{i}", tstamp=1.0, client_hash="h", judge="Judge", prompt="pair-v1", model_a=SMALL,
            model_b="Endpoint", winner=judge_winner, g1_winner=None, g2_winner=None, g1_judgment="",
            g2_judgment="", error=None, n_turns=1, conversation_a_id="a", conversation_b_id="b"))
        store.log_vote(VoteRecord(battle_id=f"b{i}", tstamp=1.0, client_hash="h", anony=False, model_a=SMALL,
                                  model_b="Endpoint", winner=human_winner, counted=True, not_counted_reason=None,
                                  conversation_a_id="a", conversation_b_id="b"))
    summary, table, plot = client.predict(api_name="/leaderboard_judge")
    assert "**3** counted judge-verdict battles" in summary
    assert "agree on **2 of 3** rounds" in summary and "(**67%**, Cohen's κ" in summary
    assert "without the rounds either called a tie, **1 of 2**" in summary
    assert sorted(row[1] for row in table["data"]) == ["Endpoint", SMALL]
    human, _, _ = client.predict(True, api_name="/leaderboard_refresh")
    assert "**4** counted anonymous and named battles" in human    # human votes never mix with the judge's


# -- the ⚖️ Ask the judge button of the side-by-side tab ---------------------------------------------------
def send_round(client, text="What is 6 times 7?"):
    return client.predict(text, SMALL, "Endpoint", 0.0, 1.0, 16, 0.0, 1.0, 16, api_name="/compare_send")


def test_asking_the_judge_streams_both_orders_then_a_verdict_stored_as_a_judge_vote(launch_app, embedded_engine,
                                                                                   servers):
    client, runtime = start(launch_app, embedded_engine, servers)
    first = client.predict(api_name="/compare_judge")
    assert "no finished round to judge" in first
    send_round(client)
    job = client.submit(api_name="/compare_judge")
    final = job.result(timeout=120)
    panels = [out for out in job.outputs()]
    assert any("▌" in p for p in panels[:-1])                              # the reasoning streams
    assert "Order 1: Model A's answer shown first" in final and "Order 2: Model B's answer shown first" in final
    assert "**Verdict:** Model B (Endpoint) wins: the judge chose it in both answer orders." in final
    store = runtime.service.store
    [row] = store.judge_vote_rows()
    assert (row["model_a"], row["model_b"], row["winner"], row["judge"]) == (SMALL, "Endpoint", "model_b", "Judge")
    assert store.count_votes() == 0                                         # never a human vote
    client.predict("a", api_name="/compare_vote")                           # the visitor disagrees
    summary, _, _ = client.predict(api_name="/leaderboard_judge")
    assert "agree on **0 of 1** round" in summary


def test_the_judge_event_without_a_judge_says_there_is_none_without_operator_flags(launch_app, embedded_engine,
                                                                                  servers):
    client, runtime = start(launch_app, embedded_engine, servers, judge=False)
    send_round(client)
    answer = client.predict(api_name="/compare_judge")     # a crafted call: the button itself is hidden
    assert "No judge model is set up on this demo" in answer and "--" not in answer
    assert runtime.service.store.judge_vote_rows() == []


def test_a_judge_that_is_also_a_contestant_gets_a_self_preference_warning(launch_app, embedded_engine, servers,
                                                                         question_file):
    client, _ = start(launch_app, embedded_engine, servers)
    status, summary, *_ = client.predict("Judge", None, "single", handle_file(str(question_file)), 16,
                                         api_name="/evaluate")
    assert status == "✅ Done." and "self-preference bias" in summary


def test_stop_cancels_the_evaluation_on_the_engines_within_2_s_and_frees_the_slot(launch_app, embedded_engine,
                                                                                  servers, question_file):
    contestant, judge_server = servers
    judge_server.delay_s = 1.0        # each judge answer takes seconds
    client, runtime = start(launch_app, embedded_engine, servers)
    job = client.submit("Endpoint", SMALL, "pairwise", handle_file(str(question_file)), 16, api_name="/evaluate")
    deadline = time.monotonic() + 120
    while not any(out[0].startswith("⏳ Judgments") for out in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.judge.evaluation_running
    other = Client(client.src, verbose=False)
    other.predict(api_name="/evaluate_stop")
    assert runtime.judge.evaluation_running              # another visitor's Stop leaves this run alone
    stopped_at = time.monotonic()
    assert client.predict(api_name="/evaluate_stop").startswith("⏹ Stopped")
    while runtime.judge.evaluation_running and time.monotonic() - stopped_at < 10:
        time.sleep(0.05)
    assert time.monotonic() - stopped_at < 2.0          # the slot is free: the engines' requests were cancelled
    judge_server.delay_s = 0.0
    status, *_ = other.predict(SMALL, "Endpoint", "pairwise", handle_file(str(question_file)), 16,
                               api_name="/evaluate")
    assert status == "✅ Done."                          # the next visitor's evaluation runs at once
