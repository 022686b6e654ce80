"""What follows a stored vote, off the visitor's path (services/after_vote.py): the judge model labels an
anonymous battle's first prompt (stored append-only, joined to the rules' labels on the category board and in
the export), a judge that fails or answers anything but the JSON asked for leaves the rules' labels, the vote
returns before the judge is asked, a full queue drops the job and keeps the vote, and the outlier-voter check
runs every N votes and takes the outlier's votes off the board.

Run: .venv/bin/python -m pytest tests/test_after_vote.py -q
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import numpy as np

from tests.engines import RecordingEngine, WordModerator
from tests.judge_server import JudgeServer
from tests.test_outliers import fill
from vicuna_demo.config import Settings
from vicuna_demo.data.categories import HARD_CRITERIA, JUDGE_KEYS, judge_labels, parse_judge_answer
from vicuna_demo.data.export import battle_record, later_labels
from vicuna_demo.data.storage import open_store
from vicuna_demo.services.arena import Arena
from vicuna_demo.services.battle import Battle, BattleService
from vicuna_demo.services.chat import ChatService, Limits
from vicuna_demo.services.leaderboard import StyleBattles, leaderboard_view

KOALA, ALPACA, JUDGE = "Koala-13B", "Alpaca-7B", "Judge"
MATH_AND_HARD = {**{key: False for key in JUDGE_KEYS}, **{key: True for key in HARD_CRITERIA[:6]}, "math": True}


class HeldEngine(RecordingEngine):
    """A judge whose answer waits until the test releases it (``release``); ``asked`` is set when a request came."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release, self.asked = threading.Event(), threading.Event()

    def stream(self, prompt, params):
        self.asked.set()
        assert self.release.wait(10)
        return super().stream(prompt, params)


def build(tmp_path, judge_engine, *, every: int = 0, moderator=None):
    engines = {KOALA: RecordingEngine(KOALA, "Paris.", 0.001), ALPACA: RecordingEngine(ALPACA, "It is Paris.", 0.001),
               JUDGE: judge_engine}
    chat = ChatService(engines, moderator or WordModerator(), open_store(tmp_path / "logs"),
                       limits=Limits(rate_limit_per_min=0))
    arena = Arena.from_settings([KOALA, ALPACA], Settings())
    return BattleService(chat, arena, rng=random.Random(3), judge=JUDGE, outlier_check_every=every)


def battle_and_vote(battles, prompt="What is 12 times 7?", client="v") -> Battle:
    battle = Battle(anonymous=True)
    list(battles.send(battle, prompt, client=client))
    battles.vote(battle, "a", client=client)
    return battle


def test_the_judges_json_labels_are_stored_after_the_vote_and_the_category_board_picks_them_up(tmp_path):
    judge = HeldEngine(JUDGE, json.dumps(MATH_AND_HARD), 0.001)
    battles = build(tmp_path, judge)
    store = battles.chat.store
    source = StyleBattles(store)
    battle = battle_and_vote(battles)
    assert source.read(anony_only=True)[2] == [["lang:en"]]    # the board read the vote before the judge answered
    judge.release.set()
    assert battles.worker.wait_idle()
    [row] = store.label_rows()
    assert (row["battle_id"], row["labeller"]) == (battle.battle_id, "judge:Judge")
    assert row["labels"] == ["math", "hard_prompt"]
    assert "What is 12 times 7?" in judge.texts()[-1]          # one request, about the first prompt
    assert len(judge.received) == 1
    # the page's board, through the cache that had read the vote before its labels came
    assert source.read(anony_only=True)[2] == [["lang:en", "math", "hard_prompt"]]
    settings = Settings(min_battles=0, judge=JUDGE)
    summary, rows, _ = leaderboard_view(battles.chat, settings, False, category="hard_prompt", style_source=source)
    assert summary.startswith("Category **hard_prompt**") and sum(r[-1] for r in rows) == 2   # one battle, 2 rows
    summary, rows, _ = leaderboard_view(battles.chat, settings, False, category="creative_writing",
                                        style_source=source)
    assert rows == [] and "No counted battles labelled creative_writing yet." in summary
    summary, _, _ = leaderboard_view(battles.chat, Settings(), False, category="instruction_following",
                                     style_source=source)
    assert "comes from the judge model, and no judge is set up" in summary
    summary, _, _ = leaderboard_view(battles.chat, Settings(judge=None), False, category="poetry", style_source=source)
    assert "No counted battles labelled poetry yet." in summary
    # the export: the labels joined, the judge's answer in FastChat/LMArena's category_tag shape
    [vote] = store.vote_rows()
    record = battle_record(vote, later=later_labels(store.label_rows()).get(vote["battle_id"]))
    assert record["categories"] == ["lang:en", "math", "hard_prompt"]
    assert record["category_tag"]["math_v0.1"] == {"math": True}
    assert sum(record["category_tag"]["criteria_v0.1"].values()) == 6
    assert record["category_tag"]["if_v0.1"] == {"if": False}


def test_a_judge_that_answers_garbage_or_fails_leaves_the_rules_labels_and_logs_why(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vicuna_demo.services.after_vote")
    for name, judge in (("prose", RecordingEngine(JUDGE, "This prompt is about math: true.", 0.001)),
                        ("partial", RecordingEngine(JUDGE, json.dumps({"math": True}), 0.001)),
                        ("failing", RecordingEngine(JUDGE, json.dumps(MATH_AND_HARD), 0.001, fail_after=1))):
        battles = build(tmp_path / name, judge)
        battle_and_vote(battles)
        assert battles.worker.wait_idle()
        store = battles.chat.store
        assert store.label_rows() == []
        [vote] = store.vote_rows()
        assert vote["counted"] and vote["categories"] == ["lang:en"]
        assert StyleBattles(store).read(anony_only=True)[2] == [["lang:en"]]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("gave no JSON labels" in m for m in messages) == 2
    assert any("could not label" in m and "injected fault" in m for m in messages)


def test_the_vote_returns_before_the_judge_is_asked_and_a_full_queue_drops_the_job_not_the_vote(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vicuna_demo.services.after_vote")
    judge = HeldEngine(JUDGE, json.dumps(MATH_AND_HARD), 0.001)
    battles = build(tmp_path, judge)
    battles.worker._queue.maxsize = 1
    started = time.perf_counter()
    first = battle_and_vote(battles)
    assert judge.asked.wait(5)                       # the judge has the request and holds its answer ...
    assert battles.chat.store.vote_rows()[0]["battle_id"] == first.battle_id   # ... the vote is stored,
    assert time.perf_counter() - started < 5 and battles.chat.store.label_rows() == []  # and returned long before
    battle_and_vote(battles, "Write a poem about rain.")           # queued behind it
    battle_and_vote(battles, "Write a poem about snow.")           # the queue is full: dropped, logged
    assert any("dropped" in r.getMessage() for r in caplog.records)
    judge.release.set()
    assert battles.worker.wait_idle()
    assert len(battles.chat.store.vote_rows()) == 3
    assert len(battles.chat.store.label_rows()) == 2


def test_a_prompt_stopped_by_moderation_or_a_vote_that_does_not_count_never_reaches_the_judge(tmp_path):
    judge = RecordingEngine(JUDGE, json.dumps(MATH_AND_HARD), 0.001)
    battles = build(tmp_path, judge)
    battles.daily_vote_cap = 1
    battle_and_vote(battles, "How is nitroglow made?")       # moderated: not counted, not sent
    battle_and_vote(battles, "What is 2 + 2?")               # counted: labelled
    battle_and_vote(battles, "What is 3 + 3?")               # over the daily cap: not counted, not sent
    assert battles.worker.wait_idle()
    assert [v["counted"] for v in battles.chat.store.vote_rows()] == [False, True, False]
    assert len(judge.received) == 1 and "2 + 2" in judge.texts()[-1]
    assert "nitroglow" not in " ".join(judge.texts())


def test_the_strict_reading_of_the_judges_answer():
    assert parse_judge_answer(json.dumps(MATH_AND_HARD)) == MATH_AND_HARD
    assert parse_judge_answer("```json\n" + json.dumps({**MATH_AND_HARD, "extra": 1}) + "\n```") == MATH_AND_HARD
    assert judge_labels(MATH_AND_HARD) == ["math", "hard_prompt"]
    assert judge_labels({**MATH_AND_HARD, HARD_CRITERIA[0]: False}) == ["math"]      # 5 of 7: not hard
    for bad in ("", "yes", "[true]", json.dumps({**MATH_AND_HARD, "math": "true"}),
                "Sure! " + json.dumps(MATH_AND_HARD)):
        assert parse_judge_answer(bad) is None


def test_the_outlier_check_runs_every_n_votes_and_the_board_leaves_the_outlier_out(tmp_path):
    battles = build(tmp_path, RecordingEngine(JUDGE, "{}", 0.001), every=2)
    store = battles.chat.store
    fill(store, np.random.default_rng(7))            # 20 honest visitors and one who always picks the weaker model
    source = StyleBattles(store)
    assert len(source.read(anony_only=True)[0]) == 20 * 60 + 40
    battle_and_vote(battles)
    assert battles.worker.wait_idle(30) and store.vote_flags() == {}   # one vote: not due yet
    battle_and_vote(battles)
    assert battles.worker.wait_idle(30)
    flags = store.vote_flags()
    assert len(flags) == 40 and set(flags.values()) == {"outlier_voter"}
    assert len(source.read(anony_only=True)[0]) == 20 * 60 + 2
    summary, _, _ = leaderboard_view(battles.chat, Settings(), False)
    assert "**40** votes" in summary and "outlier" in summary


def test_the_outlier_check_is_off_at_zero(tmp_path):
    battles = build(tmp_path, RecordingEngine(JUDGE, "{}", 0.001), every=0)
    assert battles.outliers.vote_stored() is False


def test_the_app_settings_give_the_battles_a_judge_labeller_and_the_outlier_schedule(tmp_path):
    engines = {KOALA: RecordingEngine(KOALA), ALPACA: RecordingEngine(ALPACA), JUDGE: RecordingEngine(JUDGE)}
    chat = ChatService(engines, WordModerator(), open_store(tmp_path / "logs"), limits=Limits(rate_limit_per_min=0))
    battles = BattleService.from_settings(chat, Settings(judge=JUDGE, outlier_check_every=7))
    assert battles.labeller.labeller == "judge:Judge" and battles.outliers.every == 7
    assert BattleService.from_settings(chat, Settings()).labeller is None
    battles.close()


def test_in_the_running_app_an_endpoint_judge_labels_votes_and_a_request_it_refuses_leaves_none(launch_app):
    from gradio_client import Client

    engines = {KOALA: RecordingEngine(KOALA, "Eighty-four.", 0.0), ALPACA: RecordingEngine(ALPACA, "It is 84.", 0.0)}
    refuse = lambda messages: "about rain" in messages[-1]["content"]   # noqa: E731 - a 500 to this one, always
    with JudgeServer(lambda messages: json.dumps(MATH_AND_HARD), fail_when=refuse) as server:
        url, runtime = launch_app(["--rate-limit", "0", "--endpoint", server.endpoint(JUDGE, retries=0), "--judge", JUDGE,
                                   "--arena-weights", f"{JUDGE}=0", "--min-battles", "0"], engines=engines)
        for prompt in ("What is 12 times 7?", "Write a poem about rain."):
            client = Client(url, verbose=False)
            client.predict(prompt, 0.7, 1.0, 32, api_name="/arena_send")
            assert "Thanks for voting" in client.predict("a", api_name="/arena_vote")[3]
        assert runtime.battles.worker.wait_idle(60)
        assert server.refused[500] >= 1
    [row] = runtime.store.label_rows()
    assert row["labels"] == ["math", "hard_prompt"] and len(runtime.store.vote_rows()) == 2
    summary, table, _ = client.predict(False, False, "hard_prompt", api_name="/leaderboard_refresh")
    assert summary.startswith("Category **hard_prompt**") and len(table["data"]) == 2
    summary, table, _ = client.predict(False, False, "creative_writing", api_name="/leaderboard_refresh")
    assert table["data"] == []
