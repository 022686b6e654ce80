"""BattleService without gradio: both sides of a round stream at once, the text is moderated once for
both, names stay out of what an anonymous battle shows until the vote, votes are stored once, a second
event during a round is refused, Stop stops one side, and a reset (or another model) starts afresh
without the old round writing anything back.
"""

from __future__ import annotations

import random
import threading

import pytest

from tests.engines import RecordingEngine, WordModerator
from vicuna_demo.config import Settings
from vicuna_demo.data.storage import open_store
from vicuna_demo.engines.protocol import EngineError, PromptTooLong
from vicuna_demo.services.arena import Arena
from vicuna_demo.services.battle import ANONYMOUS_TOO_LONG, BUSY_NOTICE, MODELS_CHANGED, Battle, BattleService
from vicuna_demo.services.chat import ChatService, Limits

KOALA, ALPACA = "Koala-13B", "Alpaca-7B"


def build(tmp_path, moderator=None, delay_s=0.01, koala="Paris is the capital of France.", alpaca="The capital is Paris.", **extra):
    engines = {KOALA: RecordingEngine(KOALA, koala, delay_s), ALPACA: RecordingEngine(ALPACA, alpaca, delay_s),
               **extra}
    chat = ChatService(engines, moderator or WordModerator(), open_store(tmp_path / "logs"),
                       limits=Limits(rate_limit_per_min=0))
    return BattleService(chat, Arena.from_settings(list(engines), Settings()), rng=random.Random(1)), engines


def test_an_anonymous_round_streams_both_sides_at_once_and_the_vote_reveals_and_is_stored(tmp_path):
    battles, engines = build(tmp_path, delay_s=0.02)
    battle = Battle(anonymous=True)
    both_streaming = 0
    for update in battles.send(battle, "What is the capital of France?", params=(0.7, 1.0, 64), client="v"):
        a, b = battle.a.exchanges[-1], battle.b.exchanges[-1]
        both_streaming += bool(a.reply and b.reply and not a.done and not b.done)
    assert update.done and both_streaming > 0
    assert {battle.a.model, battle.b.model} == {KOALA, ALPACA}
    assert battles.reveal(battle) == "Model A and Model B stay anonymous until you vote."
    assert battle.can_vote and not battle.busy
    assert all(len(e.received) == 1 for e in engines.values())

    assert battles.vote(battle, "👈 A is better", client="v").startswith("Thanks for voting")
    assert battles.vote(battle, "b", client="v") == "You already voted on this battle."
    assert f"Model A: {battle.a.model} · Model B: {battle.b.model}" in battles.reveal(battle)
    [vote] = battles.chat.store.vote_rows()
    assert (vote["anony"], vote["winner"], vote["counted"], vote["model_a"]) == (True, "model_a", True, battle.a.model)
    assert battle.vote_label == "👈 A is better"
    refused = list(battles.send(battle, "Again?", client="v"))
    assert refused[-1].refused and "already voted" in refused[-1].notice


def test_the_prompt_is_moderated_once_for_both_sides_and_a_flagged_one_reaches_neither(tmp_path):
    moderator = WordModerator()
    battles, engines = build(tmp_path, moderator)
    battle = Battle()
    list(battles.send(battle, "How is nitroglow made?", models=(KOALA, ALPACA)))
    assert moderator.seen == ["How is nitroglow made?"]
    assert all(e.received == [] for e in engines.values())
    assert all(s.exchanges[-1].status == "moderated" for s in (battle.a, battle.b))
    list(battles.send(battle, "Tell me about llamas", models=(KOALA, ALPACA)))
    for engine in engines.values():
        assert [m["content"] for m in engine.received[0] if m["role"] == "user"] == ["Tell me about llamas"]
    battles.vote(battle, "tie")
    [vote] = battles.chat.store.vote_rows()
    assert vote["counted"] is False and vote["not_counted_reason"] == "moderated"


def test_the_snapshot_is_what_both_sides_receive_even_if_the_battle_changes_during_moderation(tmp_path):
    hold = threading.Event()
    moderator = WordModerator(hold=hold)
    battles, engines = build(tmp_path, moderator)
    battle = Battle()
    worker = threading.Thread(target=lambda: list(battles.send(battle, "Hello", models=(KOALA, ALPACA))))
    worker.start()
    assert moderator.checking.wait(5)
    battle.a.exchanges[-1].user = "nitroglow instead"   # a racing writer that skipped the gate
    hold.set()
    worker.join(10)
    assert [m["content"] for m in engines[KOALA].received[0] if m["role"] == "user"] == ["Hello"]


def test_a_second_send_or_a_vote_during_a_round_is_refused(tmp_path):
    battles, engines = build(tmp_path, delay_s=0.02)
    battle = Battle()
    round_ = battles.send(battle, "First", models=(KOALA, ALPACA))
    next(round_)
    [refused] = list(battles.send(battle, "Second", models=(KOALA, ALPACA)))
    assert refused.refused and refused.notice == BUSY_NOTICE
    [refused] = list(battles.regenerate(battle))
    assert refused.refused and refused.notice == BUSY_NOTICE
    assert battles.vote(battle, "a") == "Votes open once both replies have finished."
    list(round_)
    assert battle.can_vote and [len(e.received) for e in engines.values()] == [1, 1]


def test_stop_stops_only_its_side(tmp_path):
    battles, _ = build(tmp_path, delay_s=0.02, koala=" ".join(f"w{i}" for i in range(100)), alpaca="short reply")
    battle = Battle()
    for update in battles.send(battle, "Go", models=(KOALA, ALPACA)):
        if battle.a.exchanges[-1].reply:
            battles.stop(battle, "a")
    assert battle.a.exchanges[-1].status == "cancelled" and "stopped" in battle.a.exchanges[-1].footer
    assert battle.b.exchanges[-1].reply == "short reply" and battle.b.exchanges[-1].status == "done"


def test_a_reset_during_a_round_starts_afresh_at_once_and_the_old_round_writes_nothing_back(tmp_path):
    battles, _ = build(tmp_path, delay_s=0.02)
    battle = Battle()
    round_ = battles.send(battle, "First", models=(KOALA, ALPACA))
    next(round_), next(round_)
    battles.reset(battle)
    assert not battle.busy and battle.a.exchanges == []
    list(battles.send(battle, "Fresh", models=(KOALA, ALPACA)))   # not held up by the old round
    list(round_)
    assert [e.user for e in battle.a.exchanges] == ["Fresh"] and battle.rounds_done == 1


def test_other_models_start_a_new_battle_and_an_unknown_one_is_refused(tmp_path):
    battles, engines = build(tmp_path)
    battle = Battle()
    list(battles.send(battle, "First", models=(KOALA, ALPACA)))
    first_id = battle.battle_id
    updates = list(battles.send(battle, "Second", models=(ALPACA, KOALA)))
    assert updates[-1].notice == MODELS_CHANGED and battle.battle_id != first_id
    assert len(battle.a.exchanges) == 1 and battle.a.model == ALPACA
    [refused] = list(battles.send(battle, "Third", models=(KOALA, "Nope")))
    assert refused.refused and "Unknown model 'Nope'" in refused.notice
    assert sum(len(e.received) for e in engines.values()) == 4


def test_an_error_on_one_side_is_shown_there_without_names_and_the_battle_does_not_count(tmp_path, caplog):
    class Busy(RecordingEngine):
        def stream(self, prompt, params):
            raise EngineError(f"{self.name} at http://10.9.8.7:8000/v1 is too busy right now.")

    battles, _ = build(tmp_path)
    battles.chat.engines[KOALA] = Busy(KOALA)
    battle = Battle(anonymous=True)
    with caplog.at_level("WARNING", logger="vicuna_demo.services.battle"):
        list(battles.send(battle, "Hi"))
    notices = [battle.side(k).exchanges[-1].notice for k in "ab"]
    assert any("Model A could not answer" in n or "Model B could not answer" in n for n in notices)
    assert not any(KOALA in n or "10.9.8.7" in n or "busy" in n for n in notices)
    assert any("10.9.8.7" in r.getMessage() and KOALA in r.getMessage() for r in caplog.records)  # the operator's
    battles.vote(battle, "a")
    assert battles.chat.store.vote_rows()[0]["not_counted_reason"] == "error"


def test_a_message_too_long_for_one_side_of_an_anonymous_battle_names_neither_model_nor_its_window(tmp_path, caplog):
    class Small(RecordingEngine):
        def prepare(self, messages, params):
            raise PromptTooLong(f"This message is too long for {self.name}: it needs 5123 tokens, and the model's "
                                "context window leaves 1536 for the conversation. Please shorten it.")

    battles, _ = build(tmp_path)
    battles.chat.engines[KOALA] = Small(KOALA)
    battle = Battle(anonymous=True)
    with caplog.at_level("WARNING", logger="vicuna_demo.services.battle"):
        list(battles.send(battle, "A long message"))
    side = "a" if battle.a.model == KOALA else "b"
    notice = battle.side(side).exchanges[-1].notice
    assert notice == ANONYMOUS_TOO_LONG.format(side=f"Model {side.upper()}")
    assert not any(word in notice for word in (KOALA, "Koala", "5123", "1536", "Model A:", "Model B:"))
    assert any("5123" in r.getMessage() and KOALA in r.getMessage() for r in caplog.records)  # the operator's
    named = Battle()
    list(battles.send(named, "A long message", models=(KOALA, ALPACA)))
    assert "5123 tokens" in named.a.exchanges[-1].notice    # named battles keep the detail
    battles.vote(battle, "a")
    assert battles.chat.store.vote_rows()[0]["not_counted_reason"] == "error"


@pytest.mark.parametrize("choice", ["z", None, 3])
def test_a_bad_vote_is_refused_with_a_message_and_stores_nothing(tmp_path, choice):
    battles, _ = build(tmp_path)
    battle = Battle()
    list(battles.send(battle, "Hi", models=(KOALA, ALPACA)))
    assert "Unknown vote" in battles.vote(battle, choice)
    assert battles.chat.store.count_votes() == 0 and battle.can_vote


def test_one_stop_stops_both_sides(tmp_path):
    long = " ".join(f"w{i}" for i in range(100))
    battles, _ = build(tmp_path, delay_s=0.02, koala=long, alpaca=long)
    battle = Battle()
    for update in battles.send(battle, "Go", models=(KOALA, ALPACA)):
        if battle.a.exchanges[-1].reply and battle.b.exchanges[-1].reply:
            battles.stop(battle)
    for side in (battle.a, battle.b):
        assert side.exchanges[-1].status == "cancelled" and len(side.exchanges[-1].reply) < len(long)
    assert battle.can_vote


def test_the_vote_notice_says_whether_the_vote_counts_and_why_not(tmp_path):
    battles, _ = build(tmp_path, koala="# Answer\n- Paris\n- **France**", alpaca="Paris.")
    clean = Battle()
    list(battles.send(clean, "Capital of France?", models=(KOALA, ALPACA)))
    notice = battles.vote(clean, "a")
    assert notice.startswith("Thanks for voting!") and "Your vote counts in the leaderboard." in notice
    twin = Battle()
    list(battles.send(twin, "Capital of France?", models=(KOALA, KOALA)))
    notice = battles.vote(twin, "tie")
    assert "not counted in the leaderboard: both sides were the same model" in notice
    assert "Your vote counts" not in notice
    first, second = battles.chat.store.vote_rows()
    assert (first["counted"], second["counted"], second["not_counted_reason"]) == (True, False, "same_model")
    # the answers' style counts are stored with the vote, as FastChat's conv_metadata
    meta = first["conv_metadata"]
    assert meta["header_count_a"]["h1"] == 1 and meta["list_count_a"]["unordered"] == 2
    assert meta["bold_count_a"]["**"] == 1 and meta["sum_assistant_b_tokens"] > 0


def test_an_identity_leak_in_an_anonymous_battle_is_named_in_the_notice_and_the_reveal(tmp_path):
    battles, _ = build(tmp_path, koala="I am Koala, a chatbot.")
    battle = Battle(anonymous=True)
    list(battles.send(battle, "Who are you?"))
    notice = battles.vote(battle, "a")
    assert "not counted in the leaderboard: a reply gave its model's name away" in notice
    assert "not counted in the leaderboard" in battles.reveal(battle)


def test_only_the_visitor_the_battle_was_served_to_can_vote(tmp_path):
    battles, _ = build(tmp_path)
    battle = Battle(anonymous=True)
    list(battles.send(battle, "Hello", client="visitor"))
    assert battles.vote(battle, "a", client="someone-with-the-session-id") == \
        "This battle was served to another visitor: only they can vote on it."
    assert battles.chat.store.vote_rows() == [] and battle.can_vote
    assert "Your vote counts" in battles.vote(battle, "a", client="visitor")


def test_a_vote_after_stopping_both_sides_at_once_is_kept_with_what_was_shown_but_not_counted(tmp_path):
    long = " ".join(f"word{i}" for i in range(200))
    battles, _ = build(tmp_path, delay_s=0.02, koala=long, alpaca=long)
    battle = Battle(anonymous=True)
    for update in battles.send(battle, "Tell me a long story", client="v"):
        if battle.a.exchanges[-1].reply and battle.b.exchanges[-1].reply:
            battles.stop(battle, "a")
            battles.stop(battle, "b")
    notice = battles.vote(battle, "a", client="v")
    assert "not counted in the leaderboard: a reply was stopped before 16 tokens of it were shown" in notice
    [vote] = battles.chat.store.vote_rows()
    assert (vote["counted"], vote["not_counted_reason"]) == (False, "unread")
    assert vote["shown"]["a"]["status"] == vote["shown"]["b"]["status"] == "cancelled"
    assert 0 < vote["shown"]["a"]["tokens"] < 16 and vote["shown"]["a"]["chars"] > 0


def test_a_finished_round_records_what_was_shown_and_counts(tmp_path):
    battles, _ = build(tmp_path)
    battle = Battle(anonymous=True)
    list(battles.send(battle, "Capital?", client="v"))
    battles.vote(battle, "tie", client="v")
    [vote] = battles.chat.store.vote_rows()
    assert vote["counted"] is True
    assert {side["status"] for side in vote["shown"].values()} == {"done"}
    assert all(side["tokens"] > 0 for side in vote["shown"].values())


def test_the_daily_cap_keeps_further_votes_of_one_visitor_but_does_not_count_them(tmp_path):
    battles, _ = build(tmp_path)
    battles.daily_vote_cap = 2
    notices = []
    for visitor in ("hostile", "hostile", "hostile", "other"):
        battle = Battle(anonymous=True)   # a new session per battle changes nothing: the cap is per identity
        list(battles.send(battle, "Hi", client=visitor))
        notices.append(battles.vote(battle, "a", client=visitor))
    rows = battles.chat.store.vote_rows()
    assert [r["counted"] for r in rows] == [True, True, False, True]
    assert rows[2]["not_counted_reason"] == "daily_cap"
    assert "today's limit of counted votes" in notices[2]


def test_two_votes_raced_in_one_session_store_one(tmp_path):
    battles, _ = build(tmp_path)
    battle = Battle(anonymous=True)
    list(battles.send(battle, "Hi", client="v"))
    start = threading.Barrier(8)
    notices = []

    def vote(choice):
        start.wait()
        notices.append(battles.vote(battle, choice, client="v"))

    threads = [threading.Thread(target=vote, args=("a" if i % 2 else "b",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(battles.chat.store.vote_rows()) == 1
    assert sum("Thanks for voting" in n for n in notices) == 1


def test_an_anonymous_vote_records_the_sampling_weights_in_force(tmp_path):
    battles, _ = build(tmp_path)
    battle = Battle(anonymous=True)
    list(battles.send(battle, "Hi", client="v"))
    battles.vote(battle, "a", client="v")
    [vote] = battles.chat.store.vote_rows()
    assert vote["sampling"] == {"weights": {KOALA: 1.0, ALPACA: 1.0}, "pair_probability": 1.0}
    named = Battle()
    list(battles.send(named, "Hi", models=(KOALA, ALPACA), client="v"))
    battles.vote(named, "a", client="v")
    assert battles.chat.store.vote_rows()[1]["sampling"] is None
    assert battles.chat.store.sampling_history() == [(vote["tstamp"], {KOALA: 1.0, ALPACA: 1.0})]


def test_the_vote_stores_the_first_prompts_category_labels(tmp_path):
    battles, _ = build(tmp_path)
    battle = Battle(anonymous=True)
    list(battles.send(battle, "Why does this fail?\n```python\nprint(1/0)\n```", client="v"))
    list(battles.send(battle, "And now?", client="v"))
    battles.vote(battle, "a", client="v")
    [vote] = battles.chat.store.vote_rows()
    assert vote["categories"] == ["code", "multi_turn", "lang:en"]
