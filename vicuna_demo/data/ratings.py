"""Bradley-Terry ratings for arena battles, on Chatbot Arena's scale (pure functions, no I/O).

A battle is ``(model_a, model_b, winner)`` with winner one of ``"model_a"``, ``"model_b"``,
``"tie"`` or ``"tie (bothbad)"``. Both kinds of tie count as half a win for each side.

Model: P(a beats b) = 1 / (1 + 10 ** (-(R_a - R_b) / 400)), i.e. a logistic loss on
ln(10) * (r_a - r_b) with displayed rating R = 400 * r + 1000. The fit minimises that loss on
counts aggregated per model pair (so 100k battles cost no more than a few hundred pairs) with
L-BFGS and a tiny L2 penalty on r, which makes the solution unique and keeps a model that
always wins at a large but finite rating.

Anchor: ratings are centred so that the MEAN rating over all models is exactly 1000. Differences
between ratings are what the data determine; adding or removing a model moves every rating.
Models in parts of the battle graph that never meet each other are each centred by the penalty;
their relative level is not determined by the data.

Confidence intervals: percentile bootstrap (2.5 / 97.5) over battles resampled with
replacement, drawn as one multinomial over the aggregated (pair, outcome) counts per round.
Rank = 1 + number of models whose ci_lower is above this model's ci_upper.

Use::

    from vicuna_demo.data.ratings import compute_leaderboard
    for row in compute_leaderboard([("a", "b", "model_a"), ("a", "b", "tie")]):
        print(row.rank, row.model, round(row.rating))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
SCALE = 400.0
CENTER = 1000.0
_LN10 = math.log(10.0)
# Penalty on the mean-normalised loss; ~1e-6 of the curvature a model with a few battles has.
_L2 = 1e-6


@dataclass(frozen=True)
class ModelRating:
    model: str
    rating: float
    ci_lower: float
    ci_upper: float
    battles: int
    rank: int


@dataclass(frozen=True)
class _Counts:
    """Battles aggregated per unordered pair (first[k] < second[k], indices into models)."""

    models: list[str]
    first: np.ndarray  # int index of the pair's first model
    second: np.ndarray  # int index of the pair's second model
    first_wins: np.ndarray  # decisive wins of first over second
    second_wins: np.ndarray
    ties: np.ndarray  # "tie" and "tie (bothbad)" together
    battles: np.ndarray  # per model, self-battles counted once


def _aggregate(battles: Iterable[tuple[str, str, str]]) -> _Counts:
    per_pair: dict[tuple[str, str], list[int]] = {}
    per_model: dict[str, int] = {}
    for n, battle in enumerate(battles):
        try:
            model_a, model_b, winner = battle
        except (TypeError, ValueError):
            raise ValueError(f"battle {n}: expected (model_a, model_b, winner), got {battle!r}") from None
        if winner not in WINNERS:
            raise ValueError(f"battle {n}: winner {winner!r} is not one of {', '.join(WINNERS)}")
        per_model[model_a] = per_model.get(model_a, 0) + 1
        if model_b != model_a:
            per_model[model_b] = per_model.get(model_b, 0) + 1
        else:
            continue  # a model against itself says nothing about ratings
        if model_a < model_b:
            key, a_is_first = (model_a, model_b), True
        else:
            key, a_is_first = (model_b, model_a), False
        cell = per_pair.setdefault(key, [0, 0, 0])
        if winner == "model_a":
            cell[0 if a_is_first else 1] += 1
        elif winner == "model_b":
            cell[1 if a_is_first else 0] += 1
        else:
            cell[2] += 1

    models = sorted(per_model)
    index = {m: i for i, m in enumerate(models)}
    keys = list(per_pair)
    table = np.array([per_pair[k] for k in keys], dtype=float).reshape(-1, 3)
    return _Counts(
        models=models,
        first=np.array([index[a] for a, _ in keys], dtype=np.intp),
        second=np.array([index[b] for _, b in keys], dtype=np.intp),
        first_wins=table[:, 0],
        second_wins=table[:, 1],
        ties=table[:, 2],
        battles=np.array([per_model[m] for m in models], dtype=np.int64),
    )


def _fit(
    n_models: int,
    first: np.ndarray,
    second: np.ndarray,
    first_score: np.ndarray,
    second_score: np.ndarray,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Return r (natural BT strength / ln 10), mean 0, maximising the penalised likelihood.

    first_score / second_score are win counts with ties already split in half.
    """
    total = float(first_score.sum() + second_score.sum())
    if n_models < 2 or total <= 0:
        return np.zeros(n_models)
    games = (first_score + second_score) / total
    first_share = first_score / total
    second_share = second_score / total

    def loss_and_grad(r: np.ndarray) -> tuple[float, np.ndarray]:
        z = _LN10 * (r[first] - r[second])
        # -log sigmoid(z) = logaddexp(0, -z); the first side scored first_share.
        loss = float(first_share @ np.logaddexp(0.0, -z) + second_share @ np.logaddexp(0.0, z))
        g_pair = _LN10 * (games * _sigmoid(z) - first_share)
        grad = np.bincount(first, g_pair, n_models) - np.bincount(second, g_pair, n_models)
        return loss + _L2 * float(r @ r), grad + 2.0 * _L2 * r

    x0 = np.zeros(n_models) if start is None else start
    result = minimize(
        loss_and_grad,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10},
    )
    r = result.x
    return r - r.mean()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _to_rating(r: np.ndarray) -> np.ndarray:
    return SCALE * r + CENTER


def compute_leaderboard(
    battles: Iterable[tuple[str, str, str]],
    *,
    bootstrap_rounds: int = 100,
    seed: int | None = 0,
) -> list[ModelRating]:
    """Fit ratings with bootstrap 95% CIs; return one row per model, best first.

    Every model named in a battle gets a row (a model seen only against itself keeps 1000).
    Raises ValueError for a malformed battle or an unknown winner value. With
    ``bootstrap_rounds=0`` the CI collapses to the point estimate.
    """
    if bootstrap_rounds < 0:
        raise ValueError("bootstrap_rounds must be >= 0")
    counts = _aggregate(battles)
    n = len(counts.models)
    if n == 0:
        return []
    first_score = counts.first_wins + 0.5 * counts.ties
    second_score = counts.second_wins + 0.5 * counts.ties
    r_hat = _fit(n, counts.first, counts.second, first_score, second_score)
    rating = _to_rating(r_hat)

    if bootstrap_rounds > 0 and len(counts.first) > 0:
        cells = np.concatenate([counts.first_wins, counts.second_wins, counts.ties])
        total = int(cells.sum())
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(total, cells / total, size=bootstrap_rounds).astype(float)
        p = len(counts.first)
        samples = np.empty((bootstrap_rounds, n))
        for k, draw in enumerate(draws):
            half_ties = 0.5 * draw[2 * p :]
            r = _fit(n, counts.first, counts.second, draw[:p] + half_ties, draw[p : 2 * p] + half_ties, r_hat)
            samples[k] = _to_rating(r)
        lower, upper = np.percentile(samples, [2.5, 97.5], axis=0)
    else:
        lower, upper = rating.copy(), rating.copy()

    ranks = [1 + int(np.sum(lower > upper[i])) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-rating[i], counts.models[i]))
    return [
        ModelRating(
            model=counts.models[i],
            rating=float(rating[i]),
            ci_lower=float(lower[i]),
            ci_upper=float(upper[i]),
            battles=int(counts.battles[i]),
            rank=ranks[i],
        )
        for i in order
    ]


def win_rate_matrix(
    battles: Iterable[tuple[str, str, str]], models: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Return (models, matrix) with matrix[i, j] = share of i's games against j that i won.

    Ties count half. NaN where i and j never met, and on the diagonal. ``models`` fixes the
    order (e.g. leaderboard order) and may name models without battles; default is sorted names.
    """
    counts = _aggregate(battles)
    names = list(counts.models if models is None else models)
    pos = {m: i for i, m in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    games = np.zeros((len(names), len(names)))
    for k in range(len(counts.first)):
        a, b = counts.models[counts.first[k]], counts.models[counts.second[k]]
        if a not in pos or b not in pos:
            continue
        i, j = pos[a], pos[b]
        t = counts.ties[k]
        wins[i, j] += counts.first_wins[k] + 0.5 * t
        wins[j, i] += counts.second_wins[k] + 0.5 * t
        n_games = counts.first_wins[k] + counts.second_wins[k] + t
        games[i, j] += n_games
        games[j, i] += n_games
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(games > 0, wins / np.where(games > 0, games, 1.0), np.nan)
    return names, matrix


def plot_win_rates(models: Sequence[str], matrix: np.ndarray):
    """Heatmap of a win-rate matrix with each cell's value written in it (Agg, no pyplot).

    Returns a matplotlib.figure.Figure; save it with ``fig.savefig(path)`` or give it to gradio.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(models)
    size = max(4.0, 0.7 * n + 2.5)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if n == 0:
        ax.text(0.5, 0.5, "no battles yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    data = np.asarray(matrix, dtype=float)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="RdBu", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=list(models), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(models))
    ax.set_xlabel("opponent")
    ax.set_ylabel("model")
    ax.set_title("Win rate of row model\nagainst column model (ties count half)", fontsize=10)
    for i in range(n):
        for j in range(n):
            if np.isfinite(data[i, j]):
                dark = abs(data[i, j] - 0.5) > 0.3
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center",
                        color="white" if dark else "black", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
