"""The leaderboard tab's view: provisional models apart, honest counts and intervals, no blank plot,
and an empty message that points only at tabs that can produce votes in this app.

``battles_view`` is tested on its own, then the running app through gradio_client (scripted engines).
Run: .venv-test/bin/python -m pytest tests/test_leaderboard_tab.py -q
"""

from __future__ import annotations

import pytest
from gradio_client import Client

from tests.engines import RecordingEngine
from vicuna_demo.data.style import StyleCounts
from vicuna_demo.services.leaderboard import HEADERS, battles_view

NAMED = (0.7, 1.0, 32, 0.7, 1.0, 32)  # temperature, top_p, max tokens for side A, then side B


def test_one_vote_is_provisional_without_rank_or_a_zero_interval():
    summary, table, figure = battles_view([("a", "b", "model_a")], kind="anonymous")
    assert summary.startswith("**1** counted anonymous battle between **2** models.")
    assert [row[0] for row in table] == ["provisional", "provisional"]
    assert [row[3] for row in table] == ["too few votes", "too few votes"]
    assert [row[1] for row in table] == ["a", "b"] and all(row[4] == 1 for row in table)
    assert 1000 < table[0][2] < 1100
    assert "fewer than 20 battles are provisional" in summary and "none is ranked" in summary
    assert figure is not None


def test_ranked_models_come_first_and_provisional_ones_follow():
    battles = ([("old", "older", "model_a")] * 15 + [("older", "old", "model_a")] * 10
               + [("new", "old", "model_a")] * 4)
    summary, table, _ = battles_view(battles, kind="judge", min_battles=20)
    assert summary.startswith("**29** counted judge battles between **3** models.")
    assert [(row[0], row[1]) for row in table] == [("1", "old"), ("1", "older"), ("provisional", "new")]
    assert table[0][3].startswith("+") and "/-" in table[0][3] and table[0][3] != "+0/-0"
    assert table[2][3] == "too few votes" and table[2][4] == 4
    assert "none is ranked" not in summary


def test_a_model_against_itself_is_left_out_and_nothing_is_drawn():
    summary, table, figure = battles_view([("solo", "solo", "model_a")], kind="anonymous and named",
                                          empty="No votes yet.")
    assert table == [] and figure is None
    assert summary == ("No votes yet. **1** vote of a model against itself is left out: it says nothing "
                       "about which model is better.")
    summary, table, _ = battles_view([("solo", "solo", "tie")] * 2 + [("a", "b", "tie")], kind="named")
    assert summary.startswith("**1** counted named battle between **2** models. **2** votes of a model "
                              "against itself are left out")


def figure_texts(figure) -> list[str]:
    return [t.get_text() for ax in figure.axes for t in ax.texts] + [ax.get_title() for ax in figure.axes]


def test_win_rate_cells_with_few_battles_show_their_count_not_a_certain_rate():
    battles = [("a", "b", "model_a")] + [("a", "c", "model_a")] * 12 + [("c", "a", "model_a")] * 4
    summary, _, figure = battles_view(battles, kind="anonymous")
    texts = figure_texts(figure)
    assert "1.00" not in texts and "0.00" not in texts          # a-b: one vote is not a certain win
    assert texts.count("n=1") == 2                              # a-b and b-a, drawn grey with their count
    assert "0.75" in texts and "0.25" in texts                  # a-c: 16 battles, a real rate
    assert any("grey: fewer than 10 battles" in t for t in texts)
    assert "pairs with fewer than 10 battles are grey" in summary


def test_the_style_controlled_view_explains_itself_and_shows_the_coefficients():
    long, short = StyleCounts(tokens=400), StyleCounts(tokens=100)
    battles = [("wordy", "terse", "model_a")] * 30 + [("terse", "wordy", "model_b")] * 10 \
        + [("terse", "wordy", "model_a")] * 10
    style = [(long, short)] * 30 + [(short, long)] * 20
    summary, table, _ = battles_view(battles, kind="anonymous", style=style)
    assert "**Style control is on**" in summary and "length **" in summary and "headers **+0.000**" in summary
    assert {row[1] for row in table} == {"wordy", "terse"}


@pytest.fixture
def app(launch_app):
    def start(names, argv=()):
        url, runtime = launch_app(list(argv), engines={n: RecordingEngine(n, "A short reply.", 0.0) for n in names})
        return Client(url, verbose=False), runtime.service.store
    return start


def named_vote(client, model_a, model_b, vote="a"):
    client.submit("Which is the largest planet?", model_a, model_b, *NAMED, api_name="/compare_send").result(timeout=60)
    client.predict(vote, api_name="/compare_vote")


def test_with_one_model_the_empty_leaderboard_does_not_send_visitors_to_the_arena(app):
    client, store = app(["Solo"])
    summary, table, plot = client.predict(True, api_name="/leaderboard_refresh")
    assert "only Solo is loaded here" in summary and "--model" not in summary   # operator flags: the log
    assert "Arena" not in summary and table["data"] == [] and plot is None
    named_vote(client, "Solo", "Solo")
    [vote] = store.vote_rows()  # kept, marked as not counted: it says nothing about which model is better
    assert (vote["counted"], vote["not_counted_reason"]) == (False, "same_model")
    summary, table, plot = client.predict(True, api_name="/leaderboard_refresh")
    assert "only Solo is loaded" in summary
    assert table["data"] == [] and plot is None


def test_with_anonymous_battles_off_the_empty_leaderboard_points_to_side_by_side(app):
    client, _ = app(["Koala", "Alpaca"], ["--arena-weights", "Koala=1,Alpaca=0"])
    summary, _, _ = client.predict(False, api_name="/leaderboard_refresh")
    assert "Side by side" in summary and "tick the box" in summary


def test_style_control_toggle_through_the_api(app):
    client, store = app(["Koala", "Alpaca"], ["--min-battles", "1"])
    named_vote(client, "Koala", "Alpaca")
    assert store.vote_rows()[0]["conv_metadata"]["sum_assistant_a_tokens"] > 0
    raw, _, _ = client.predict(True, api_name="/leaderboard_refresh")
    styled, table, _ = client.predict(True, True, api_name="/leaderboard_refresh")
    assert "Style control" not in raw and "**Style control is on**" in styled
    assert [row[1] for row in table["data"]] == ["Koala", "Alpaca"]


def test_the_category_choice_rates_only_battles_with_that_label(app):
    client, store = app(["Koala", "Alpaca"], ["--min-battles", "1"])
    client.submit("Why does this crash?\n```python\nprint(1/0)\n```", "Koala", "Alpaca", *NAMED,
                  api_name="/compare_send").result(timeout=60)
    client.predict("a", api_name="/compare_vote")
    client.predict(api_name="/compare_clear")
    named_vote(client, "Koala", "Alpaca", vote="b")
    assert [v["categories"] for v in store.vote_rows()] == [["code", "lang:en"], ["lang:en"]]
    summary, table, _ = client.predict(True, False, "code", api_name="/leaderboard_refresh")
    assert summary.startswith("Category **code**: **1** counted")
    assert [row[1] for row in table["data"]] == ["Koala", "Alpaca"]
    summary, _, _ = client.predict(True, True, "lang:en", api_name="/leaderboard_refresh")
    assert "**2** counted" in summary and "Style control is on" in summary


def test_min_battles_flag_decides_who_is_ranked_in_the_app(app):
    client, _ = app(["Koala", "Alpaca"], ["--min-battles", "1"])
    named_vote(client, "Koala", "Alpaca")
    summary, table, plot = client.predict(True, api_name="/leaderboard_refresh")
    assert table["headers"] == HEADERS
    assert [(row[0], row[1]) for row in table["data"]] == [("1", "Koala"), ("1", "Alpaca")]
    assert all(row[3] != "too few votes" and row[3] != "+0/-0" for row in table["data"])
    assert "provisional" not in summary and plot is not None


def test_the_summary_notes_when_models_were_added_or_removed():
    from vicuna_demo.services.leaderboard import sampling_changes, sampling_text

    history = ([(1.0, {"A": 1.0, "B": 1.0})] * 3 + [(2.0, {"A": 1.0, "B": 1.0, "C": 1.0})] * 2
               + [(3.0, {"A": 2.0, "B": 0.0, "C": 1.0})])
    assert sampling_changes(history) == ["after 3 battles: C added", "after 5 battles: B removed, A's weight 1 -> 2"]
    text = sampling_text(history)
    assert "with weights A=2, B=0, C=1" in text and "**The arena's models changed**" in text
    assert sampling_text(history[:2]) == " Pairs are drawn uniformly."
