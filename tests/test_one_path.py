"""One path from text to an engine (engines/dispatch.py): chat, the judge and evaluations follow its rules, and
Stop (or a consumer that goes away) ends the work on the engine within 2 s wherever it came from; the
"one evaluation at a time" slot is free right after an evaluation's Stop."""

from __future__ import annotations

import threading
import time

import pytest

from moderation import ModerationResult
from tests.engines import RecordingEngine, SlowEngine, WordModerator
from vicuna_demo.data.storage import NullStore
from vicuna_demo.engines.dispatch import Blocked, CancelToken, Dispatcher, UnknownModel
from vicuna_demo.engines.protocol import EngineError, SamplingParams
from vicuna_demo.evaluation.questions import Question
from vicuna_demo.services.chat import ChatService, Limits
from vicuna_demo.services.judge import JudgeService
from vicuna_demo.services.session import ChatSession

STOP_WITHIN_S = 2.0
QUESTIONS = [Question(question_id=i, category="writing", turns=(f"Question {i}?",)) for i in range(1, 5)]


def drain_in_thread(iterator, into: list) -> threading.Thread:
    def run():
        for item in iterator:
            into.append(item)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# -- the rules ---------------------------------------------------------------------------------------
class NoPenalty(RecordingEngine):
    unsupported_params = frozenset({"repetition_penalty"})
    defaults = SamplingParams(temperature=0.2, top_p=0.9, max_new_tokens=300)


def test_sampling_is_the_models_defaults_under_the_flags_and_what_an_engine_cannot_apply_is_reported():
    engine = NoPenalty("Small", reply="  Hello there")
    dispatcher = Dispatcher({"Small": engine}, flags={"temperature": 0.5, "repetition_penalty": 1.3},
                            max_new_tokens_cap=128)
    assert dispatcher.defaults_for("Small") == SamplingParams(temperature=0.5, top_p=0.9, max_new_tokens=128)
    reply = dispatcher.send("Small", [{"role": "user", "content": "Hi"}], SamplingParams(repetition_penalty=1.2))
    assert reply.params.repetition_penalty == 1.0 and reply.ignored == ["repetition_penalty"]
    assert "cannot apply a repetition penalty" in " ".join(reply.notices)
    assert reply.text() == "Hello there"                     # the template's leading space is not the reply's
    assert reply.stats.finish_reason == "stop" and reply.stats.n_tokens == 4   # two blank chunks, two words


def test_text_new_to_a_model_is_moderated_with_the_one_rule_and_a_flagged_text_never_reaches_it():
    engine, moderator = RecordingEngine("Model"), WordModerator()
    dispatcher = Dispatcher({"Model": engine}, moderate=moderator.check)
    with pytest.raises(Blocked) as blocked:
        dispatcher.send("Model", [{"role": "user", "content": "nitroglow"}], SamplingParams(), new_text=["nitroglow"])
    assert blocked.value.verdict.status == "flagged" and engine.received == []
    with pytest.raises(Blocked):                             # a verdict the caller already has counts the same
        dispatcher.send("Model", [{"role": "user", "content": "x"}], SamplingParams(),
                        verdict=ModerationResult.flagged(["violence"]))
    with pytest.raises(UnknownModel, match="choose one of: Model"):
        dispatcher.send("Other", [{"role": "user", "content": "x"}], SamplingParams())


def test_a_timeout_ends_the_request_on_the_engine_and_is_an_error():
    engine = SlowEngine(delay_s=0.2)
    reply = Dispatcher({"Slow": engine}, timeout_s=0.5).send("Slow", [{"role": "user", "content": "x"}],
                                                             SamplingParams())
    started = time.monotonic()
    with pytest.raises(EngineError, match="timed out"):
        reply.text()
    assert time.monotonic() - started < 0.5 + STOP_WITHIN_S and engine.all_ended(0)
    assert reply.stats.finish_reason == "error" and engine.replies[0].cancelled_at is not None


def test_a_consumer_that_stops_reading_ends_the_request_and_a_finished_one_leaves_the_token_alone():
    engine, token = SlowEngine(delay_s=0.05), CancelToken()
    dispatcher = Dispatcher({"Slow": engine})
    reply = dispatcher.send("Slow", [{"role": "user", "content": "x"}], SamplingParams(), cancel=token)
    deltas = iter(reply)
    next(deltas)
    reply.close()                                            # what a closed page does to the chat's generator
    assert engine.all_ended(STOP_WITHIN_S) and reply.stats.finish_reason == "cancelled"
    assert token._callbacks == []                            # the finished request unbound itself from Stop


# -- Stop, from each route ---------------------------------------------------------------------------
def test_chat_stop_ends_the_engine_request_within_2_s():
    engine = SlowEngine()
    service = ChatService({"Slow": engine}, WordModerator(), NullStore(), limits=Limits(rate_limit_per_min=0))
    session, updates = ChatSession(), []
    thread = drain_in_thread(service.turn(session, "Tell me a long story", model="Slow"), updates)
    assert engine.started.wait(10)
    stopped_at = time.monotonic()
    service.stop(session)
    assert engine.all_ended(STOP_WITHIN_S) and time.monotonic() - stopped_at < STOP_WITHIN_S
    thread.join(STOP_WITHIN_S)
    assert updates[-1].status == "cancelled" and updates[-1].done
    assert not session.gate.busy                             # the visitor may send the next message


def test_the_judge_ends_both_games_on_its_engine_within_2_s_when_the_visitor_leaves():
    judge_engine = SlowEngine("Judge", delay_s=0.3)
    judge = JudgeService({"Judge": judge_engine}, NullStore(), judge="Judge")
    rounds = judge.judge_round(["Q?"], ["answer a"], ["answer b"], model_a="A", model_b="B", battle_id="b",
                               conversation_a_id="ca", conversation_b_id="cb", client_hash="c")
    next(rounds)                                             # the judge is streaming its reasoning
    assert len(judge_engine.replies) == 2
    stopped_at = time.monotonic()
    rounds.close()                                           # gradio closes the event's generator
    assert judge_engine.all_ended(STOP_WITHIN_S) and time.monotonic() - stopped_at < STOP_WITHIN_S
    assert all(r.cancelled_at is not None for r in judge_engine.replies)


def evaluation_service(engine: SlowEngine) -> JudgeService:
    chat = ChatService({"Slow": engine, "Judge": RecordingEngine("Judge", "[[A]]")}, WordModerator(), NullStore())
    judge = JudgeService(chat.engines, NullStore(), judge="Judge", moderator=chat.moderator, max_in_flight=4,
                         dispatcher=chat.dispatcher)
    judge.answer_defaults = chat.defaults_for
    return judge


def test_evaluation_stop_ends_every_request_on_the_engine_within_2_s_and_frees_the_slot():
    engine = SlowEngine()
    judge = evaluation_service(engine)
    events = []
    thread = drain_in_thread(judge.evaluate(QUESTIONS, "Slow", None, mode="single", owner="visitor"), events)
    deadline = time.monotonic() + 10
    while len(engine.replies) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(engine.replies) == 4 and judge.evaluation_running
    stopped_at = time.monotonic()
    assert judge.stop_evaluation("visitor")
    assert engine.all_ended(STOP_WITHIN_S)
    thread.join(STOP_WITHIN_S)
    assert not judge.evaluation_running and time.monotonic() - stopped_at < STOP_WITHIN_S
    assert events[-1].stage == "done" and events[-1].result.cancelled
    assert all(r.cancelled_at is not None for r in engine.replies)


def test_an_evaluation_whose_consumer_goes_away_ends_its_engine_requests_and_frees_the_slot():
    engine = SlowEngine()
    judge = evaluation_service(engine)
    run = judge.evaluate(QUESTIONS, "Slow", None, mode="single", owner="visitor")
    assert next(run).stage == "answers"                      # the first progress event: the answers are asked
    assert engine.started.wait(10)
    stopped_at = time.monotonic()
    run.close()                                              # the page was closed: gradio closes the generator
    assert engine.all_ended(STOP_WITHIN_S) and not judge.evaluation_running
    assert time.monotonic() - stopped_at < STOP_WITHIN_S


# -- endpoints: their engine retries, the path does not ----------------------------------------------
def test_an_endpoint_is_retried_by_its_engine_only_and_stop_ends_a_retry_wait_within_2_s():
    from tests.judge_server import JudgeServer
    from vicuna_demo.config import EndpointSpec
    from vicuna_demo.engines.remote import RemoteEngine
    with JudgeServer(lambda m: "never", fail_when=lambda m: True) as failing:
        engine = RemoteEngine(EndpointSpec.parse(failing.endpoint("Down", retries=2)))
        try:
            reply = Dispatcher({"Down": engine}).send("Down", [{"role": "user", "content": "x"}], SamplingParams())
            with pytest.raises(EngineError, match="500"):
                reply.text()
            assert failing.received == 3 and failing.refused[500] == 3      # 1 + its 2 retries, no more
        finally:
            engine.close()
    with JudgeServer(lambda m: "never", max_concurrent=0, retry_after=30) as busy:
        engine = RemoteEngine(EndpointSpec.parse(busy.endpoint("Busy")))
        try:
            token = CancelToken()
            reply = Dispatcher({"Busy": engine}).send("Busy", [{"role": "user", "content": "x"}], SamplingParams(),
                                                      cancel=token)
            done = threading.Event()
            threading.Thread(target=lambda: (reply.text(), done.set()), daemon=True).start()
            deadline = time.monotonic() + 10
            while busy.received < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            stopped_at = time.monotonic()
            token.cancel()                                      # Stop, while the engine waits out Retry-After: 30
            assert done.wait(STOP_WITHIN_S) and time.monotonic() - stopped_at < STOP_WITHIN_S
            assert reply.stats.finish_reason == "cancelled" and busy.received == 1
        finally:
            engine.close()


def test_the_apps_judge_and_evaluations_share_the_chats_path_and_its_moderation_rule():
    from vicuna_demo.config import load_settings
    moderator = WordModerator()
    chat = ChatService({"Model": RecordingEngine("Model"), "Judge": RecordingEngine("Judge", "[[5]]")}, moderator,
                       NullStore())
    judge = JudgeService.from_settings(chat, load_settings(["--judge", "Judge", "--log-dir", ""], environ={}))
    assert judge.dispatcher is chat.dispatcher and chat.dispatcher.moderate == moderator.check
    flagged = Question(question_id=9, category="writing", turns=("Hi",), reference=("nitroglow",))
    *_, done = judge.evaluate([flagged], "Model", None, mode="single")
    assert "moderation" in done.result.answers["Model"][9].error and chat.engines["Model"].received == []


def test_a_request_closed_before_it_was_read_is_cancelled_and_lets_go_of_stop_and_its_timer():
    engine, token = SlowEngine(delay_s=0.05), CancelToken()
    reply = Dispatcher({"Slow": engine}, timeout_s=30).send("Slow", [{"role": "user", "content": "x"}],
                                                            SamplingParams(), cancel=token)
    reply.close()
    assert engine.replies[0].cancelled_at is not None and reply.stats.finish_reason == "cancelled"
    assert token._callbacks == [] and reply._timer.finished.is_set()      # the timer will not fire
