"""The 📋 Evaluate tab's service side on a CPU, with scripted engines: answers only without a judge, the time
estimate from measured speeds (and the batch the run uses), the answer length a CPU model starts from, and Stop
keeping what was done; then the answers-only flow in a real browser (estimate, results, one progress bar, Stop),
the app served as `python app.py` serves it."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import zipfile

import pytest

from moderation import NoModerator
from tests.engines import RecordingEngine
from vicuna_demo.config import Settings
from vicuna_demo.data.storage import open_store
from vicuna_demo.engines.protocol import ReplyStats, SamplingParams
from vicuna_demo.engines.sampling_defaults import CPU_MAX_NEW_TOKENS
from vicuna_demo.evaluation.questions import parse_questions
from vicuna_demo.services.chat import ChatService
from vicuna_demo.services.judge import NO_JUDGE, JudgeService
from vicuna_demo.services.session import ChatSession

QUESTIONS = parse_questions(
    '{"question_id": 1, "category": "writing", "turns": ["Write about the sea.", "Now make it rhyme."]}\n'
    '{"question_id": 2, "category": "math", "turns": ["What is 6 times 7?"]}\n')
LONG = "one two three four five six seven eight nine ten eleven twelve"


@pytest.fixture
def store(tmp_path):
    store = open_store(tmp_path / "logs")
    yield store
    store.close()


def no_judge(store, **engines) -> JudgeService:
    engines = engines or {"A": RecordingEngine("A", LONG, delay_s=0.0), "B": RecordingEngine("B", LONG, delay_s=0.0)}
    return JudgeService(engines, store, judge=None, max_in_flight=4)


def run_to_end(events) -> list:
    return list(events)


def test_answers_only_needs_no_judge_and_offers_fastchat_answer_files(store):
    judge = no_judge(store)
    assert judge.modes() == ("answers",)
    with pytest.raises(ValueError, match=NO_JUDGE):
        next(iter(judge.evaluate(QUESTIONS, "A", "B", mode="pairwise")))
    *progress, done = run_to_end(judge.evaluate(QUESTIONS, "A", "B", mode="answers", max_new_tokens=64))
    # 0/4 at once (the page clears an earlier run's results), 0/4 again once moderation has passed, then each answer
    assert [(e.stage, e.done, e.total) for e in progress] == [("answers", n, 4) for n in (0, 0, 1, 2, 3, 4)]
    assert done.stage == "done"
    assert not done.result.cancelled and done.done_line() == "4 of 4 answers"
    headers, rows = done.table()
    assert headers[:3] == ["model", "answers", "missing"] and [r[:3] for r in rows] == [["A", 2, 0], ["B", 2, 0]]
    with zipfile.ZipFile(done.archive) as z:
        names = set(z.namelist())
        assert {"evaluation/model_answer/A.jsonl", "evaluation/model_answer/B.jsonl"} <= names
        assert not any("model_judgment" in n for n in names)
        record = json.loads(z.read("evaluation/model_answer/A.jsonl").decode().splitlines()[0])
    assert record["choices"][0]["turns"] == [LONG, LONG] and record["generate_params"]["max_new_tokens"] == 64
    assert not judge.evaluation_running


def test_the_estimate_is_questions_turns_and_tokens_over_measured_speed_with_the_batch_as_a_range(store):
    judge = JudgeService({"A": RecordingEngine("A"), "B": RecordingEngine("B"), "J": RecordingEngine("J")}, store,
                         judge="J", max_in_flight=4)
    unknown = judge.estimate(QUESTIONS, "A", "B", mode="pairwise", max_new_tokens=600)
    assert unknown.seconds is None and "no speed measured for A, B" in unknown.text
    judge.speeds.record_reply("A", ReplyStats(n_tokens=101, decode_s=10.0))      # 10 tok/s
    judge.speeds.record_reply("B", ReplyStats(n_tokens=51, decode_s=10.0))       # 5 tok/s
    judge.speeds.record_reply("B", ReplyStats(n_tokens=3, decode_s=0.01))        # too short to say anything
    estimate = judge.estimate(QUESTIONS, "A", "B", mode="pairwise", max_new_tokens=600)
    # 3 turns x 600 tokens = 1,800 per model; 4 requests at once = 2 per model. Side by side at 2x: B's
    # 1800 / (5 x 2) = 180 s; no gain from the batch and taking turns: 1800 / 10 + 1800 / 5 = 540 s
    assert (estimate.seconds, estimate.most_s) == (180.0, 540.0)
    for words in ("About 3 to 9 minutes", "2 questions (3 turns) × at most 600 tokens", "2 answer(s) at once",
                  "A: 10.0 tok/s per reply", "B: 5.0 tok/s per reply (its last reply)",
                  "Then 6 judge requests (not in this estimate)"):
        assert words in estimate.text, (words, estimate.text)
    assert "judge request" not in judge.estimate(QUESTIONS, "A", None, mode="answers", max_new_tokens=600).text
    # an earlier evaluation's answers at this very batch: one figure, said where it comes from
    judge.speeds.record_batch("A", tokens=2000, seconds=100.0, streams=2)            # 20 tok/s all together
    judge.speeds.record_batch("B", tokens=1000, seconds=100.0, streams=2)
    measured = judge.estimate(QUESTIONS, "A", "B", mode="answers", max_new_tokens=600)
    assert measured.seconds == measured.most_s == 180.0
    assert measured.text.startswith("⏱ **About 3 minutes** for the answers") and "shorter time" not in measured.text
    assert "A: 20.0 tok/s with 2 answer(s) at once, measured in 1 earlier evaluation here" in measured.text
    # a run at another batch (one question: 1 answer at once per model) takes one stream's share of that figure
    other = JudgeService({"A": RecordingEngine("A")}, store, judge=None, max_in_flight=4)
    other.speeds.record_batch("A", tokens=2000, seconds=100.0, streams=2)
    one = other.estimate(QUESTIONS[:1], "A", None, mode="answers", max_new_tokens=600)     # 1,200 tokens at 10 tok/s
    assert one.seconds == one.most_s == 120.0 and "A: 10.0 tok/s per answer in 1 earlier evaluation" in one.text


def test_an_evaluation_measures_the_speed_the_next_estimate_uses(store):
    judge = no_judge(store, A=RecordingEngine("A", LONG, delay_s=0.05))
    assert judge.speeds.batch_speed("A") is None
    run_to_end(judge.evaluate(QUESTIONS, "A", None, mode="answers", max_new_tokens=64))   # 3 turns, ~1.8 s
    measured = judge.speeds.batch_speed("A", judge.streams(1, len(QUESTIONS)))
    assert measured is not None and measured.streams == 2 and 5 < measured.tok_s < 30
    assert "measured in 1 earlier evaluation" in judge.estimate(QUESTIONS, "A", None, mode="answers").text


def test_visitors_replies_measure_each_models_speed(store):
    service = ChatService({"A": RecordingEngine("A", LONG, delay_s=0.01)}, NoModerator(), store)
    for _ in service.turn(ChatSession(), "Hello", model="A", client="visitor"):
        pass
    judge = JudgeService.from_settings(service, Settings())
    speed = judge.speeds.reply_speed("A")
    assert speed is not None and speed.samples == 1 and speed.tok_s > 10
    assert "A: " in judge.estimate(QUESTIONS, "A", None, mode="answers").text


def test_answers_start_from_a_cpu_models_shorter_default_length(store):
    cpu, gpu = RecordingEngine("Cpu"), RecordingEngine("Gpu")
    cpu.defaults = SamplingParams(max_new_tokens=CPU_MAX_NEW_TOKENS)
    gpu.defaults = SamplingParams(max_new_tokens=1024)
    judge = JudgeService.from_settings(ChatService({"Cpu": cpu, "Gpu": gpu}, NoModerator(), store), Settings())
    assert judge.answer_tokens(["Gpu"]) == 512
    assert judge.answer_tokens(["Gpu", "Cpu"]) == judge.answer_tokens(["Cpu", None]) == CPU_MAX_NEW_TOKENS == 256


def test_stop_ends_the_run_with_what_was_done_in_the_same_formats_and_frees_the_slot(store):
    slow = RecordingEngine("A", LONG, delay_s=0.2)               # 2.4 s per turn
    judge = no_judge(store, A=slow, B=RecordingEngine("B", LONG, delay_s=0.0))
    events = judge.evaluate(QUESTIONS, "A", "B", mode="answers", owner="visitor")
    seen = []
    for event in events:
        seen.append(event)
        if event.stage == "answers" and event.done == 0:
            time.sleep(0.5)                                        # B's two answers are in, A's are not
            assert not judge.stop_evaluation("someone else")
            stopped_at = time.monotonic()
            assert judge.stop_evaluation("visitor")
        if event.stage == "done":
            assert not judge.evaluation_running                   # free before the page draws the results
            break
    done = seen[-1]
    assert done.stage == "done" and done.result.cancelled and time.monotonic() - stopped_at < 2.0
    assert done.done_line() == "2 of 4 answers"
    assert "cancelled before it finished" in " ".join(done.summary["problems"])
    with zipfile.ZipFile(done.archive) as z:
        a = [json.loads(line) for line in z.read("evaluation/model_answer/A.jsonl").decode().splitlines()]
        b = [json.loads(line) for line in z.read("evaluation/model_answer/B.jsonl").decode().splitlines()]
    assert [r.get("error") for r in a] == ["cancelled", "cancelled"] and [r.get("error") for r in b] == [None, None]
    assert judge.speeds.batch_speed("B") is None      # a stopped run's time is no measure of its answers' speed


# -- the page -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def served_without_a_judge(tmp_path, engine):
    from app import create_app, serve
    from vicuna_demo.config import load_settings
    settings = load_settings(["--moderation", "off", "--rate-limit", "0", "--log-dir", str(tmp_path / "logs")],
                             environ={})
    demo, runtime = create_app(settings, engines={"Koala": engine})
    url, _ = serve(demo, runtime, settings, block=False, server_name="127.0.0.1", server_port=None)
    try:
        yield url, runtime
    finally:
        demo.close()
        runtime.close()


@pytest.mark.browser
def test_without_a_judge_the_page_answers_estimates_then_stops_showing_what_was_done(tmp_path):
    if not shutil.which("/usr/bin/chromium"):
        pytest.skip("chromium is not installed")
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=30_000)       # a 2-core machine shared with other test runs
    engine = RecordingEngine("Koala", "Koala says the sea is wide.", delay_s=0.03)
    with served_without_a_judge(tmp_path, engine) as (url, runtime), sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("tab", name="📋 Evaluate").click()
        zip_link = page.locator("#evaluate-archive a[href$='evaluation.zip']")
        expect(page.locator("#evaluate-unavailable")).to_contain_text("No judge model is set up on this demo")
        expect(page.locator("#evaluate-questions")).to_be_hidden()          # no judge: the app takes no uploads
        expect(page.locator("#evaluate-estimate")).to_contain_text("No time estimate yet: no speed measured for Koala")
        page.locator("#evaluate-run").click()
        expect(page.locator("#evaluate-status")).to_contain_text("Done", timeout=120_000)
        expect(page.locator("#evaluate-summary")).to_contain_text("Answers only: nothing was judged.")
        expect(page.locator("#evaluate-table")).to_contain_text("Koala")
        expect(zip_link).to_be_visible()
        # the run measured Koala's speed at this batch: the estimate says so before the next run
        expect(page.locator("#evaluate-estimate")).to_contain_text("measured in 1 earlier evaluation here")
        engine.delay_s = 0.5                                 # a slow second run, stopped part-way
        page.locator("#evaluate-run").click()
        expect(page.locator("#evaluate-status")).to_contain_text("⏳ Answers")
        expect(page.locator("#evaluate-table")).not_to_contain_text("Koala")       # the last run's table is gone
        expect(zip_link).to_have_count(0)
        expect(page.locator(".progress-text, .progress-level").first).to_be_visible()
        drawn = page.evaluate("() => [...document.querySelectorAll('[data-testid=status-tracker]')].filter(t => "
                              "t.getBoundingClientRect().height > 0 && t.innerText.trim()).map(t => "
                              "(t.closest('[id]') || {}).id)")
        assert drawn == ["evaluate-status"]                                   # one progress bar, over the status
        page.locator("#evaluate-stop").click()
        expect(page.locator("#evaluate-status")).to_contain_text(f"of {runtime.judge.builtin_size()} answers")
        assert "⏹ Stopped" in page.locator("#evaluate-status").inner_text()
        expect(page.locator("#evaluate-table")).to_contain_text("Koala")            # what was done, shown ...
        expect(zip_link).to_be_visible()                                  # ... and offered
        assert not runtime.judge.evaluation_running
        browser.close()
