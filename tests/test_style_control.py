"""Style-controlled ratings, reweighting and sandwich intervals (data/style.py, data/contextual.py,
ratings.fit_board) and the leaderboard command line's --style-control / --reweight / --ci.

Run: .venv/bin/python -m pytest tests/test_style_control.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vicuna_demo.data.ratings import STYLE_REG, compute_leaderboard, fit_board
from vicuna_demo.data.simulate import EXAMPLE_STRENGTHS, simulate
from vicuna_demo.data.style import (STYLE_FEATURES, StyleCounts, conv_metadata, count_style, counts_from_conversation,
                                    counts_from_metadata, raw_features, style_features)

ROOT = Path(__file__).resolve().parents[1]


def battles_of(rows):
    return [(r["model_a"], r["model_b"], r["winner"]) for r in rows]


def styles_of(rows):
    return [counts_from_metadata(r["conv_metadata"]) for r in rows]


def aligned(strengths):
    mean = np.mean(list(strengths.values()))
    return {m: s - mean + 1000.0 for m, s in strengths.items()}


def test_markdown_counts_ignore_code_blocks():
    text = ("# Title\n## Part\nSome **bold** and __also bold__ text.\n- one\n* two\n1. first\n2. second\n"
            "```python\n# not a header\n- not a list\n**not bold**\n```\nend")
    counts = count_style(text)
    assert counts.headers == (1, 1, 0, 0, 0, 0)
    assert (counts.unordered, counts.ordered) == (2, 2)
    assert (counts.bold_stars, counts.bold_underscores) == (1, 1)
    assert counts.vector()[1:] == (2, 4, 2)
    assert count_style("an unclosed fence\n```\n# hidden").headers == (0,) * 6


def test_engine_token_count_replaces_the_estimate():
    assert count_style("three words here").tokens == 3
    assert count_style("three words here", tokens=7).tokens == 7


def test_conv_metadata_round_trips_in_fastchats_shape():
    a, b = count_style("# H\n- x\n**b**", tokens=10), count_style("plain", tokens=4)
    meta = conv_metadata(a, b)
    assert meta["sum_assistant_a_tokens"] == 10 and meta["sum_assistant_b_tokens"] == 4
    assert meta["header_count_a"] == {"h1": 1, "h2": 0, "h3": 0, "h4": 0, "h5": 0, "h6": 0}
    assert meta["list_count_a"] == {"ordered": 0, "unordered": 1}
    assert meta["bold_count_a"] == {"**": 1, "__": 0}
    assert counts_from_metadata(json.loads(json.dumps(meta))) == (a, b)
    assert counts_from_metadata({"sum_assistant_a_tokens": 3}) is None
    broken = dict(meta, sum_assistant_b_tokens="many")
    assert counts_from_metadata(broken) is None


def test_counts_from_a_conversation_sum_the_assistant_turns_only():
    conversation = [{"role": "user", "content": "# a header in the question"},
                    {"role": "assistant", "content": "- one"}, {"role": "user", "content": "more"},
                    {"role": "assistant", "content": [{"type": "text", "text": "- two"}]}]
    counts = counts_from_conversation(conversation)
    assert counts.unordered == 2 and sum(counts.headers) == 0


def test_features_are_normalised_differences_over_sums():
    pairs = [(StyleCounts(tokens=30), StyleCounts(tokens=10)), (StyleCounts(tokens=10), StyleCounts(tokens=30)),
             (StyleCounts(), StyleCounts())]
    raw = raw_features(pairs)
    assert raw[:, 0].tolist() == [0.5, -0.5, 0.0]
    assert raw[2].tolist() == [0.0] * 4  # nothing on either side: no difference
    features = style_features(pairs)
    assert features[:, 0].mean() == pytest.approx(0.0) and features[:, 0].std() == pytest.approx(1.0)
    assert features[:, 1:].tolist() == [[0.0] * 3] * 3  # a constant feature stays 0


def test_style_control_removes_a_pure_length_advantage():
    """'verbose' is exactly as strong as m2 but answers three times as long, and voters like length."""
    rows = simulate(6000, seed=1)
    battles = battles_of(rows)
    truth = aligned(EXAMPLE_STRENGTHS)
    raw = {r.model: r for r in compute_leaderboard(battles, bootstrap_rounds=0)}
    board = fit_board(battles, style=styles_of(rows), ci="sandwich")
    controlled = {r.model: r for r in board.rows}
    assert raw["verbose"].rating > truth["verbose"] + 40           # the raw board is fooled...
    assert raw["verbose"].rating > raw["m1"].rating
    for model, rating in truth.items():                             # ...the controlled one is not
        assert controlled[model].ci_lower - 5 <= rating <= controlled[model].ci_upper + 5, model
    assert controlled["verbose"].rating < controlled["m1"].rating
    assert board.style_coefficients["sum_assistant_tokens"] == pytest.approx(0.5, abs=0.08)
    assert set(board.style_coefficients) == set(STYLE_FEATURES)


def test_without_a_style_effect_the_controlled_board_matches_the_raw_one():
    rows = simulate(4000, length_effect=0.0, seed=2)
    raw = {r.model: r.rating for r in compute_leaderboard(battles_of(rows), bootstrap_rounds=0)}
    board = fit_board(battles_of(rows), style=styles_of(rows), ci="sandwich")
    assert abs(board.style_coefficients["sum_assistant_tokens"]) < 0.08
    for row in board.rows:
        assert row.rating == pytest.approx(raw[row.model], abs=15)


def test_the_default_style_penalty_keeps_the_effect_and_arena_ranks_default_shrinks_it():
    rows = simulate(4000, seed=3)
    kept = fit_board(battles_of(rows), style=styles_of(rows), ci="sandwich")
    shrunk = fit_board(battles_of(rows), style=styles_of(rows), ci="sandwich", style_reg=1.0)
    assert STYLE_REG <= 1e-3
    assert kept.style_coefficients["sum_assistant_tokens"] > 0.4
    assert shrunk.style_coefficients["sum_assistant_tokens"] < 0.15


def test_sandwich_and_bootstrap_intervals_agree_on_well_specified_battles():
    rows = simulate(4000, seed=4)
    sandwich = {r.model: r for r in fit_board(battles_of(rows), style=styles_of(rows), ci="sandwich").rows}
    boot = fit_board(battles_of(rows), style=styles_of(rows), ci="bootstrap", bootstrap_rounds=100).rows
    for row in boot:
        width, other = row.ci_upper - row.ci_lower, sandwich[row.model].ci_upper - sandwich[row.model].ci_lower
        assert width == pytest.approx(other, rel=0.25)
        assert row.rating == pytest.approx(sandwich[row.model].rating, abs=1e-6)


def test_reweighting_stops_an_oversampled_pair_from_setting_the_ratings():
    """One pair battled 20 times as often as the others: with 1 / max(n, 50) weights each pair counts alike."""
    rng = np.random.default_rng(5)
    truth = {"a": 1100.0, "b": 1000.0, "c": 900.0}
    battles = []
    for pair, n in ((("a", "b"), 4000), (("b", "c"), 200), (("a", "c"), 200)):
        p = 1 / (1 + 10 ** (-(truth[pair[0]] - truth[pair[1]]) / 400))
        battles += [(*pair, "model_a" if rng.random() < p else "model_b") for _ in range(n)]
    plain = fit_board(battles, ci="sandwich")
    weighted = fit_board(battles, reweight=True, ci="sandwich")
    assert weighted.reweight and not plain.reweight
    width = {r.model: r.ci_upper - r.ci_lower for r in plain.rows}
    wide = {r.model: r.ci_upper - r.ci_lower for r in weighted.rows}
    assert wide["c"] > width["c"]  # the oversampled pair no longer counts as 4000 battles' worth
    equal = [(*pair, w) for pair in (("a", "b"), ("b", "c"), ("a", "c")) for w in ["model_a"] * 60 + ["model_b"] * 40]
    assert [r.rating for r in fit_board(equal, reweight=True, ci="sandwich").rows] == pytest.approx(
        [r.rating for r in fit_board(equal, ci="sandwich").rows])


def test_fit_board_refuses_misaligned_style_and_unknown_interval_methods():
    with pytest.raises(ValueError, match="style has 1 entries for 2 battles"):
        fit_board([("a", "b", "model_a")] * 2, style=[(StyleCounts(), StyleCounts())])
    with pytest.raises(ValueError, match="ci must be one of"):
        fit_board([("a", "b", "model_a")], ci="jackknife")


def test_a_single_battle_gives_finite_style_controlled_ratings():
    board = fit_board([("a", "b", "model_a")], style=[(StyleCounts(tokens=50), StyleCounts(tokens=5))],
                      ci="sandwich")
    assert all(np.isfinite([r.rating, r.ci_lower, r.ci_upper]).all() for r in board.rows)
    assert all(r.provisional for r in board.rows)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vicuna_demo.data.leaderboard", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_style_control_reads_conv_metadata_and_prints_the_coefficients(tmp_path):
    rows = simulate(3000, seed=6)
    rows[0] = {k: v for k, v in rows[0].items() if k != "conv_metadata"}          # no counts at all: skipped
    rows[1] = {k: v for k, v in rows[1].items() if k != "conv_metadata"} | {     # counted from the conversation
        "conversation_a": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long " * 50}],
        "conversation_b": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short"}]}
    path = tmp_path / "battles.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli(path, "--json", "--style-control", "--ci", "sandwich", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"min_battles", "models", "style_coefficients"}
    assert set(printed["models"][0]) == {"model", "rating", "ci_lower", "ci_upper", "battles", "rank", "provisional"}
    assert printed["style_coefficients"]["sum_assistant_tokens"] == pytest.approx(0.5, abs=0.1)
    assert "2999 battles" in result.stderr and "1 no style counts" in result.stderr
    ranked = [m["model"] for m in printed["models"]]
    assert ranked.index("verbose") > ranked.index("m1")
    table = run_cli(path, "--style-control", "--reweight", "--bootstrap", "20", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "style coefficients (log-odds per standard deviation): sum_assistant_tokens +0." in table.stdout


def test_cli_rejects_a_negative_style_penalty(tmp_path):
    path = tmp_path / "battles.jsonl"
    path.write_text(json.dumps({"model_a": "a", "model_b": "b", "winner": "model_a"}) + "\n")
    result = run_cli(path, "--style-control", "--style-reg", "-1", cwd=tmp_path)
    assert result.returncode == 2 and "--style-reg must be >= 0" in result.stderr
