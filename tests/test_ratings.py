"""Behaviour tests for vicuna_demo.data.ratings (Bradley-Terry fit with a weak prior, intervals, provisional
models, ranks, win rates).

Run: .venv-test/bin/python -m pytest tests/test_ratings.py -q
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.optimize import minimize

from vicuna_demo.data.ratings import (MIN_BATTLES, PRIOR_SD, ModelRating, compute_leaderboard, plot_win_rates,
                                      win_rate_matrix)

TRUE_RATINGS = {"m0": 1200.0, "m1": 1100.0, "m2": 1000.0, "m3": 900.0, "m4": 800.0}


def simulate(rng: np.random.Generator, true: dict[str, float], n: int, tie_share: float = 0.0):
    """Battles between random distinct pairs, outcomes drawn from the Bradley-Terry model."""
    names = list(true)
    strength = np.array([true[m] for m in names])
    a = rng.integers(0, len(names), n)
    b = (a + rng.integers(1, len(names), n)) % len(names)
    p_a = 1.0 / (1.0 + 10.0 ** (-(strength[a] - strength[b]) / 400.0))
    u = rng.random(n)
    tie = rng.random(n) < tie_share
    winners = np.where(tie, "tie", np.where(u < p_a, "model_a", "model_b"))
    return [(names[i], names[j], str(w)) for i, j, w in zip(a, b, winners)]


def by_model(rows: list[ModelRating]) -> dict[str, ModelRating]:
    return {r.model: r for r in rows}


def test_order_is_recovered_and_cis_cover_true_ratings():
    rng = np.random.default_rng(20261126)
    mean = np.mean(list(TRUE_RATINGS.values()))
    aligned = {m: r - mean + 1000.0 for m, r in TRUE_RATINGS.items()}  # anchor: mean is 1000
    covered = total = 0
    for sim in range(30):
        rows = compute_leaderboard(simulate(rng, TRUE_RATINGS, 5000), seed=sim)
        assert [r.model for r in rows] == list(TRUE_RATINGS)
        for r in rows:
            covered += r.ci_lower <= aligned[r.model] <= r.ci_upper
            total += 1
    print(f"95% CI coverage: {covered}/{total}")
    assert covered / total >= 0.90


def test_ratings_are_anchored_at_mean_1000_on_the_400_point_scale():
    rows = compute_leaderboard(simulate(np.random.default_rng(3), TRUE_RATINGS, 20000), bootstrap_rounds=0)
    assert np.mean([r.rating for r in rows]) == pytest.approx(1000.0, abs=1e-6)
    spread = rows[0].rating - rows[-1].rating
    assert spread == pytest.approx(400.0, abs=40.0)


def test_a_pair_with_only_ties_gets_equal_ratings():
    rows = by_model(compute_leaderboard([("a", "b", "tie")] * 5 + [("b", "a", "tie (bothbad)")] * 5))
    assert rows["a"].rating == pytest.approx(rows["b"].rating, abs=1e-6)
    assert rows["a"].rating == pytest.approx(1000.0, abs=1e-6)


def unregularised_bradley_terry(battles) -> dict[str, float]:
    """Chatbot Arena's fit, written independently: per-battle logistic loss, no penalty, mean 1000."""
    names = sorted({m for a, b, _ in battles for m in (a, b)})
    index = {m: i for i, m in enumerate(names)}
    a = np.array([index[x[0]] for x in battles])
    b = np.array([index[x[1]] for x in battles])
    score_a = np.array([{"model_a": 1.0, "model_b": 0.0}.get(w, 0.5) for _, _, w in battles])

    def loss(r):
        z = math.log(10.0) * (r[a] - r[b]) / 400.0
        return float(np.sum(score_a * np.logaddexp(0.0, -z) + (1.0 - score_a) * np.logaddexp(0.0, z)))

    r = minimize(loss, np.zeros(len(names)), method="BFGS", options={"gtol": 1e-9}).x
    return dict(zip(names, r - r.mean() + 1000.0))


def test_many_votes_stay_within_a_point_of_the_unregularised_fit():
    battles = simulate(np.random.default_rng(2026), TRUE_RATINGS, 3000, tie_share=0.2)
    expected = unregularised_bradley_terry(battles)
    rows = compute_leaderboard(battles, bootstrap_rounds=0)
    gaps = {r.model: abs(r.rating - expected[r.model]) for r in rows}
    print("gap to the unregularised fit:", {m: round(g, 3) for m, g in gaps.items()})
    assert max(gaps.values()) < 1.0
    assert max(gaps.values()) > 0.0  # the prior is there, just negligible with ~1,200 battles per model


def test_one_vote_gives_modest_provisional_ratings_with_a_wide_interval():
    rows = by_model(compute_leaderboard([("winner", "loser", "model_a")]))
    assert 1000 < rows["winner"].rating < 1100 and 900 < rows["loser"].rating < 1000
    assert rows["winner"].rating + rows["loser"].rating == pytest.approx(2000.0)
    for r in rows.values():
        assert r.provisional and r.rank is None and r.battles == 1
        assert r.ci_upper - r.ci_lower > 300  # one vote says little; never a zero-width interval


def test_a_model_that_won_every_battle_stays_finite_modest_and_uncertain():
    rows = compute_leaderboard([("champ", "b", "model_a")] * 20 + [("c", "champ", "model_b")] * 20
                               + [("b", "c", "model_a"), ("b", "c", "model_b")])
    champ = rows[0]
    assert champ.model == "champ" and champ.rank == 1 and not champ.provisional
    assert all(math.isfinite(x) for r in rows for x in (r.rating, r.ci_lower, r.ci_upper))
    assert 1200 < champ.rating < 1000 + 2 * PRIOR_SD
    # every bootstrap resample is the same 40 wins: the interval comes from the fit's curvature instead
    assert champ.ci_upper - champ.ci_lower > 100
    assert champ.ci_lower < champ.rating < champ.ci_upper


@pytest.mark.parametrize("battles", [
    [("a", "b", "model_a")],
    [("a", "b", "tie")] * 30,
    [("a", "b", "model_b")] * 30,
    [("a", "b", "model_a"), ("c", "d", "tie")],
], ids=["one-vote", "only-ties", "all-wins", "two-islands"])
@pytest.mark.parametrize("rounds", [0, 100])
def test_no_interval_has_zero_width(battles, rounds):
    for r in compute_leaderboard(battles, bootstrap_rounds=rounds):
        assert r.ci_upper - r.ci_lower > 10, r


def test_models_with_fewer_than_min_battles_are_provisional_and_do_not_move_ranks():
    rng = np.random.default_rng(4)
    established = simulate(rng, {"top": 1300.0, "mid": 1000.0, "low": 700.0}, 3000)
    newcomer = [("new", "low", "model_a")] * 5
    rows = by_model(compute_leaderboard(established + newcomer, min_battles=MIN_BATTLES))
    assert MIN_BATTLES == 20
    assert rows["new"].provisional and rows["new"].rank is None and rows["new"].battles == 5
    assert {m: (r.rank, r.provisional) for m, r in rows.items() if m != "new"} == {
        "top": (1, False), "mid": (2, False), "low": (3, False)}
    # the threshold is a parameter; 0 ranks everybody
    everybody = by_model(compute_leaderboard(established + newcomer, min_battles=0))
    assert all(not r.provisional and r.rank is not None for r in everybody.values())
    just_enough = by_model(compute_leaderboard(newcomer * 4, min_battles=20))
    assert not just_enough["new"].provisional and just_enough["new"].battles == 20


def test_tie_counts_as_half_a_win_for_each_side():
    # a vanishing prior: this checks the likelihood alone
    rows = by_model(compute_leaderboard([("a", "b", "model_a")] * 3 + [("a", "b", "tie")], prior_sd=1e6))
    diff = rows["a"].rating - rows["b"].rating
    expected_score = 1.0 / (1.0 + 10.0 ** (-diff / 400.0))
    assert expected_score == pytest.approx(3.5 / 4.0, abs=1e-4)


def test_bothbad_tie_is_a_tie():
    plain = compute_leaderboard([("a", "b", "model_a")] * 3 + [("a", "b", "tie")], seed=1)
    bothbad = compute_leaderboard([("a", "b", "model_a")] * 3 + [("a", "b", "tie (bothbad)")], seed=1)
    assert plain == bothbad


def test_side_of_the_battle_does_not_matter():
    forward = compute_leaderboard([("a", "b", "model_a"), ("a", "b", "model_b"), ("a", "b", "model_a")])
    mirrored = compute_leaderboard([("b", "a", "model_b"), ("b", "a", "model_a"), ("b", "a", "model_b")])
    assert [(r.model, round(r.rating, 6)) for r in forward] == [(r.model, round(r.rating, 6)) for r in mirrored]


def test_hundred_thousand_battles_fit_and_bootstrap_quickly():
    battles = simulate(np.random.default_rng(7), TRUE_RATINGS, 100_000, tie_share=0.2)
    start = time.perf_counter()
    rows = compute_leaderboard(battles, bootstrap_rounds=100)
    elapsed = time.perf_counter() - start
    print(f"100k battles, fit + 100 bootstrap rounds: {elapsed:.2f} s")
    assert elapsed < 30.0
    assert [r.model for r in rows] == list(TRUE_RATINGS)
    assert sum(r.battles for r in rows) == 2 * 100_000


def test_empty_input_gives_empty_leaderboard():
    assert compute_leaderboard([]) == []
    models, matrix = win_rate_matrix([])
    assert models == [] and matrix.shape == (0, 0)


def test_a_model_seen_only_against_itself_keeps_the_anchor_with_no_counted_battles():
    [row] = compute_leaderboard([("solo", "solo", "tie")] * 3)
    assert row == ModelRating("solo", 1000.0, 1000.0, 1000.0, 0, None, provisional=True)  # self-battles say nothing


def test_invalid_parameters_are_rejected():
    for kwargs in ({"bootstrap_rounds": -1}, {"min_battles": -1}, {"prior_sd": 0.0}):
        with pytest.raises(ValueError):
            compute_leaderboard([("a", "b", "tie")], **kwargs)


def test_models_that_never_met_get_finite_ratings():
    rows = by_model(compute_leaderboard([("a", "b", "model_a"), ("a", "b", "model_b"), ("a", "b", "model_a"),
                                         ("c", "d", "model_b"), ("d", "c", "tie")]))
    assert set(rows) == {"a", "b", "c", "d"}
    assert all(math.isfinite(r.rating) for r in rows.values())
    assert rows["a"].rating > rows["b"].rating and rows["d"].rating > rows["c"].rating
    models, matrix = win_rate_matrix([("a", "b", "model_a"), ("c", "d", "model_b")])
    assert np.isnan(matrix[models.index("a"), models.index("c")])


def test_rank_is_one_plus_models_whose_lower_bound_beats_my_upper_bound():
    rng = np.random.default_rng(11)
    true = {"top": 1300.0, "close": 1290.0, "mid": 1000.0, "low": 700.0}
    rows = compute_leaderboard(simulate(rng, true, 6000))
    for r in rows:
        assert r.rank == 1 + sum(o.ci_lower > r.ci_upper for o in rows)
    ranks = {r.model: r.rank for r in rows}
    assert ranks["top"] == ranks["close"] == 1  # indistinguishable: they share rank 1
    assert ranks["mid"] == 3 and ranks["low"] == 4


def test_bootstrap_is_reproducible_with_a_seed():
    battles = simulate(np.random.default_rng(5), TRUE_RATINGS, 2000)
    assert compute_leaderboard(battles, seed=42) == compute_leaderboard(battles, seed=42)
    assert compute_leaderboard(battles, seed=42) != compute_leaderboard(battles, seed=43)


def test_battle_counts_per_model():
    rows = by_model(compute_leaderboard([("a", "b", "model_a"), ("b", "c", "tie"), ("a", "c", "model_b"),
                                         ("a", "a", "model_a")]))
    assert {m: r.battles for m, r in rows.items()} == {"a": 2, "b": 2, "c": 2}  # a against itself: not a battle


def test_unknown_winner_is_rejected():
    with pytest.raises(ValueError, match="winner"):
        compute_leaderboard([("a", "b", "leftvote")])


def test_win_rate_matrix_counts_ties_as_half_and_uses_both_sides():
    battles = [("a", "b", "model_a")] * 3 + [("b", "a", "tie")] + [("b", "a", "model_a")] * 2
    models, matrix = win_rate_matrix(battles)
    assert models == ["a", "b"]
    assert matrix[0, 1] == pytest.approx(3.5 / 6)
    assert matrix[1, 0] == pytest.approx(2.5 / 6)
    assert np.isnan(matrix[0, 0]) and np.isnan(matrix[1, 1])


def test_win_rate_matrix_follows_a_given_model_order():
    models, matrix = win_rate_matrix([("a", "b", "model_a")], models=["b", "a"])
    assert models == ["b", "a"]
    assert matrix[0, 1] == 0.0 and matrix[1, 0] == 1.0


def test_plot_win_rates_draws_a_heatmap_with_numbers(tmp_path):
    models, matrix = win_rate_matrix([("a", "b", "model_a"), ("a", "b", "tie"), ("c", "a", "model_b")])
    fig = plot_win_rates(models, matrix)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"0.75", "0.25", "1.00", "0.00"} <= texts
    fig.savefig(tmp_path / "win_rates.png")
    assert (tmp_path / "win_rates.png").stat().st_size > 1000


def test_plot_win_rates_handles_no_models():
    fig = plot_win_rates([], np.zeros((0, 0)))
    assert fig.axes


def test_the_winners_a_rating_accepts_are_the_ones_the_store_keeps():
    """One home for the vote values: the ratings and the store share records.WINNERS (not two copies)."""
    from vicuna_demo.data import ratings, records, storage
    assert ratings.WINNERS is records.WINNERS is storage.WINNERS
    with pytest.raises(ValueError, match="is not one of"):
        ratings.compute_leaderboard([("a", "b", "bothbad")])


def test_the_heatmap_of_20_models_still_writes_every_value_compactly_and_40_says_it_does_not():
    names = [f"model-{i}" for i in range(20)]
    matrix = np.full((20, 20), 0.625)
    np.fill_diagonal(matrix, np.nan)
    games = np.full((20, 20), 40)
    games[0, 1] = games[1, 0] = 3
    fig = plot_win_rates(names, matrix, games)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 20 * 19 and texts.count("62") == 20 * 19 - 2 and texts.count("3") == 2
    assert "Win rate (%)" in fig.axes[0].get_title() and "the number is battles" in fig.axes[0].get_title()
    many = plot_win_rates([f"m{i}" for i in range(40)], np.full((40, 40), 0.5))
    assert len(many.axes[0].texts) == 0 and "40 models: colours only" in many.axes[0].get_title()
