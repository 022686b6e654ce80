"""Bradley-Terry ratings for arena battles, on Chatbot Arena's scale (pure functions, no I/O).

A battle is ``(model_a, model_b, winner)`` with winner one of ``"model_a"``, ``"model_b"``,
``"tie"`` or ``"tie (bothbad)"``. Both kinds of tie count as half a win for each side.

Model: P(a beats b) = 1 / (1 + 10 ** (-(R_a - R_b) / 400)), i.e. a logistic loss on
ln(10) * (r_a - r_b) with displayed rating R = 400 * r + 1000. The fit minimises that loss on
counts aggregated per model pair (so 100k battles cost no more than a few hundred pairs) with
Newton's method (contextual.fit: the loss is convex and there are as many parameters as models).

Weak prior: every rating also gets a Gaussian prior centred on 1000 with a standard deviation of
PRIOR_SD = 200 points (an L2 penalty sum((R - 1000)^2) / (2 * 200^2) added to the summed
negative log-likelihood). Without it, a model that won every battle has no finite maximum
likelihood: one vote gave 2123 against -123. With it, one win gives about 1071 against 929 and
twenty straight wins stay finite. Its pull shrinks with the number of battles (it weighs
about as much as three battles), so with hundreds of battles per model the ratings stay
within a point of the unregularised fit that Chatbot Arena reports. The prior also makes the
solution unique.

Anchor: ratings are centred so that the MEAN rating over all models is exactly 1000. Differences
between ratings are what the data determine; adding or removing a model moves every rating.
Models in parts of the battle graph that never meet each other are each centred by the prior;
their relative level is not determined by the data.

Confidence intervals: percentile bootstrap (2.5 / 97.5) over battles resampled with
replacement, drawn as one multinomial over the aggregated (pair, outcome) counts per round,
widened where needed to the normal interval from the curvature of the penalised fit (1.96
standard errors). The widening matters only when every resample is alike (one battle, or a model
that won every battle): the bootstrap then gives a zero-width interval, which would claim
certainty the votes do not give.

Provisional: a model with fewer than ``min_battles`` battles (MIN_BATTLES = 20 by default) is
marked provisional and gets no rank. A newcomer's 95% interval against established models is
about +-200 points after 5 battles, +-160 after 10, +-115 after 20 and +-60 after 80 (median of
simulations); at 20 battles it starts to separate models 200 points apart, which is the spread
of a small arena. Below 20 battles the prior also moves a rating by more than a tenth of its
distance from 1000 (prior curvature 1/0.5^2 = 4 against about ln(10)^2 / 4 = 1.3 per battle).
Rank = 1 + the number of ranked (non-provisional) models whose ci_lower is above this model's
ci_upper; provisional models do not move the ranks of the others.

LMArena's options (``fit_board``): style control (answer length and markdown fitted beside the ratings,
with an L2 penalty of strength STYLE_REG on the style coefficients only; features in style.py),
reweighting by pair frequency, and sandwich (closed-form) intervals beside the bootstrap; the method is in
contextual.py. Without any of them ``fit_board`` is ``compute_leaderboard``.

STYLE_REG = 1e-4, on arena-rank's scale (the loss is a mean over battles, so the penalty does not fade
with more battles): on generated battles it recovers a planted length effect of 0.5 to within 0.02,
where arena-rank's default of 1.0 shrinks it to about 0.07 (tests/test_style_control.py, docs/arena.md).

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

from . import contextual
from .records import WINNERS  # the stored vote values (their one home; the store checks votes against them)
from .style import STYLE_FEATURES, StyleCounts, style_features

SCALE = 400.0
CENTER = 1000.0
PRIOR_SD = 200.0     # rating points; see the module docstring
MIN_BATTLES = 20     # fewer battles: provisional, no rank; see the module docstring
MAX_CELL_TEXTS = 15    # the heatmap writes each cell's value in full ("0.62", "n=3") for up to this many models,
MAX_COMPACT_TEXTS = 24  # and compactly (a percentage, "62"; a battle count, "3") up to this many
                        # (above, colours only: 30 models would add about 0.5 s to a page refresh on 2 cores)
MIN_PAIR_BATTLES = 10  # a win-rate cell of fewer battles is drawn grey with its count (a rate of 1/1 means little)
STYLE_REG = 1e-4    # L2 strength on the style coefficients, arena-rank's (mean-loss) scale; see docs/arena.md
CI_METHODS = ("bootstrap", "sandwich")
_LN10 = math.log(10.0)
_OUTCOME = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class ModelRating:
    model: str
    rating: float
    ci_lower: float
    ci_upper: float
    battles: int
    rank: int | None          # None for a provisional model
    provisional: bool = False


TOO_FEW_VOTES = "too few votes"


def interval_text(row: ModelRating) -> str:
    """The 95% interval as ``+up/-down`` rating points, or "too few votes" for a provisional model or
    an interval that would round to zero width (never shown as certainty the votes do not give)."""
    up, down = round(row.ci_upper - row.rating), round(row.rating - row.ci_lower)
    if row.provisional or up + down <= 0:
        return TOO_FEW_VOTES
    return f"+{up}/-{down}"


def without_self_battles(battles: Iterable[tuple[str, str, str]]) -> tuple[list[tuple[str, str, str]], int]:
    """(battles between two different models, how many battles of a model against itself were dropped)."""
    battles = list(battles)
    kept = [b for b in battles if b[0] != b[1]]
    return kept, len(battles) - len(kept)


@dataclass(frozen=True)
class _Counts:
    """Battles aggregated per unordered pair (first[k] < second[k], indices into models)."""

    models: list[str]
    first: np.ndarray  # int index of the pair's first model
    second: np.ndarray  # int index of the pair's second model
    first_wins: np.ndarray  # decisive wins of first over second
    second_wins: np.ndarray
    ties: np.ndarray  # "tie" and "tie (bothbad)" together
    battles: np.ndarray  # per model, battles against itself not counted


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
        if model_b == model_a:  # a model against itself says nothing about ratings: listed, not counted
            per_model.setdefault(model_a, 0)
            continue
        per_model[model_a] = per_model.get(model_a, 0) + 1
        per_model[model_b] = per_model.get(model_b, 0) + 1
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
    prior_sd: float,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Return r (rating - 1000) / 400, mean 0, maximising the likelihood times the Gaussian prior.

    first_score / second_score are win counts with ties already split in half. The loss is divided
    by the number of games so that its scale does not depend on how many votes there are.
    """
    total = float(first_score.sum() + second_score.sum())
    if n_models < 2 or total <= 0:
        return np.zeros(n_models)
    # each pair as two rows: the first side's score as wins, the second side's as losses
    rows = contextual.Rows(a=np.concatenate([first, first]), b=np.concatenate([second, second]),
                           outcome=np.concatenate([np.ones(len(first)), np.zeros(len(first))]),
                           count=np.concatenate([first_score, second_score]).astype(float),
                           weight=np.ones(2 * len(first)), features=np.zeros((2 * len(first), 0)))
    r, _ = contextual.fit(rows, n_models, prior_sd, 0.0, start)
    return r


def _standard_errors(
    n_models: int, first: np.ndarray, second: np.ndarray, games: np.ndarray, r: np.ndarray, prior_sd: float
) -> np.ndarray:
    """Rating-point standard errors from the curvature of the penalised loss at r (Laplace).

    The ratings are shown centred on their mean, so the common shift (fixed only by the prior) is
    projected out of the covariance.
    """
    z = _LN10 * (r[first] - r[second])
    p = _sigmoid(z)
    weight = _LN10**2 * games * p * (1.0 - p)
    hessian = np.eye(n_models) / (prior_sd / SCALE) ** 2
    np.add.at(hessian, (first, first), weight)
    np.add.at(hessian, (second, second), weight)
    np.add.at(hessian, (first, second), -weight)
    np.add.at(hessian, (second, first), -weight)
    center = np.eye(n_models) - 1.0 / n_models
    covariance = center @ np.linalg.inv(hessian) @ center
    return SCALE * np.sqrt(np.clip(np.diag(covariance), 0.0, None))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _to_rating(r: np.ndarray) -> np.ndarray:
    return SCALE * r + CENTER


def compute_leaderboard(
    battles: Iterable[tuple[str, str, str]],
    *,
    bootstrap_rounds: int = 100,
    seed: int | None = 0,
    min_battles: int = MIN_BATTLES,
    prior_sd: float = PRIOR_SD,
) -> list[ModelRating]:
    """Fit ratings with 95% intervals; return one row per model, best first.

    Every model named in a battle gets a row; a battle of a model against itself is not counted (a model
    seen only against itself keeps 1000 with 0 battles).
    A model with fewer than ``min_battles`` battles is provisional: ``rank`` None, and it does not
    count in the others' ranks. Raises ValueError for a malformed battle, an unknown winner value,
    or a negative ``bootstrap_rounds`` / ``min_battles`` or non-positive ``prior_sd``. With
    ``bootstrap_rounds=0`` the interval is the normal interval from the fit's curvature alone.
    """
    if bootstrap_rounds < 0:
        raise ValueError("bootstrap_rounds must be >= 0")
    if min_battles < 0:
        raise ValueError("min_battles must be >= 0")
    if not prior_sd > 0:
        raise ValueError("prior_sd must be > 0")
    counts = _aggregate(battles)
    n = len(counts.models)
    if n == 0:
        return []
    first_score = counts.first_wins + 0.5 * counts.ties
    second_score = counts.second_wins + 0.5 * counts.ties
    r_hat = _fit(n, counts.first, counts.second, first_score, second_score, prior_sd)
    rating = _to_rating(r_hat)
    if len(counts.first) > 0:
        se = _standard_errors(n, counts.first, counts.second, first_score + second_score, r_hat, prior_sd)
    else:
        se = np.zeros(n)  # no two different models met: nothing is measured
    lower, upper = rating - _Z95 * se, rating + _Z95 * se

    if bootstrap_rounds > 0 and len(counts.first) > 0:
        cells = np.concatenate([counts.first_wins, counts.second_wins, counts.ties])
        total = int(cells.sum())
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(total, cells / total, size=bootstrap_rounds).astype(float)
        p = len(counts.first)
        samples = np.empty((bootstrap_rounds, n))
        for k, draw in enumerate(draws):
            half_ties = 0.5 * draw[2 * p :]
            r = _fit(n, counts.first, counts.second, draw[:p] + half_ties, draw[p : 2 * p] + half_ties,
                     prior_sd, r_hat)
            samples[k] = _to_rating(r)
        boot_lower, boot_upper = np.percentile(samples, [2.5, 97.5], axis=0)
        lower, upper = np.minimum(lower, boot_lower), np.maximum(upper, boot_upper)

    return _ranked_rows(counts.models, counts.battles, rating, lower, upper, min_battles)


def _ranked_rows(models: list[str], battles: np.ndarray, rating: np.ndarray, lower: np.ndarray,
                 upper: np.ndarray, min_battles: int) -> list[ModelRating]:
    """One ModelRating per model, best first, with ranks among the non-provisional models."""
    n = len(models)
    provisional = battles < min_battles
    ranked = np.flatnonzero(~provisional)
    ranks = [None if provisional[i] else 1 + int(np.sum(lower[ranked] > upper[i])) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-rating[i], models[i]))
    return [
        ModelRating(
            model=models[i],
            rating=float(rating[i]),
            ci_lower=float(lower[i]),
            ci_upper=float(upper[i]),
            battles=int(battles[i]),
            rank=ranks[i],
            provisional=bool(provisional[i]),
        )
        for i in order
    ]


@dataclass(frozen=True)
class Board:
    """A leaderboard and how it was computed: ``style_coefficients`` (feature -> log-odds per standard
    deviation) when style-controlled, else None."""

    rows: list[ModelRating]
    style_coefficients: dict[str, float] | None = None
    ci: str = "bootstrap"
    reweight: bool = False


def fit_board(
    battles: Sequence[tuple[str, str, str]],
    *,
    style: Sequence[tuple[StyleCounts | Sequence[float], StyleCounts | Sequence[float]]] | None = None,
    style_reg: float = STYLE_REG,
    reweight: bool = False,
    ci: str = "bootstrap",
    bootstrap_rounds: int = 100,
    seed: int | None = 0,
    min_battles: int = MIN_BATTLES,
    prior_sd: float = PRIOR_SD,
) -> Board:
    """``compute_leaderboard`` with LMArena's options (see contextual.py for the method).

    ``style``: each battle's (side A, side B) style counts (StyleCounts, or the four counts in
    STYLE_FEATURES order), aligned with ``battles``: the ratings are then
    style-controlled and the board carries the fitted coefficients. ``reweight``: weigh each battle by
    1 / max(battles of its pair, 50). ``ci``: "bootstrap" (as compute_leaderboard) or "sandwich" (closed
    form, one fit). Raises ValueError for bad arguments or a ``style`` not aligned with ``battles``.
    """
    if ci not in CI_METHODS:
        raise ValueError(f"ci must be one of {', '.join(CI_METHODS)}, got {ci!r}")
    if not style_reg >= 0:
        raise ValueError("style_reg must be >= 0")
    battles = list(battles)
    if style is not None and len(style) != len(battles):
        raise ValueError(f"style has {len(style)} entries for {len(battles)} battles")
    if style is None and not reweight and ci == "bootstrap":
        return Board(compute_leaderboard(battles, bootstrap_rounds=bootstrap_rounds, seed=seed,
                                         min_battles=min_battles, prior_sd=prior_sd))
    if bootstrap_rounds < 0 or min_battles < 0 or not prior_sd > 0:
        raise ValueError("bootstrap_rounds and min_battles must be >= 0 and prior_sd > 0")
    counts = _aggregate(battles)  # validates the battles; names and battles per model
    models, n = counts.models, len(counts.models)
    if n == 0:
        return Board([], dict.fromkeys(STYLE_FEATURES, 0.0) if style is not None else None, ci, reweight)
    index = {m: i for i, m in enumerate(models)}
    keep = [k for k, (a, b, _) in enumerate(battles) if a != b]
    a = np.array([index[battles[k][0]] for k in keep], dtype=np.intp)
    b = np.array([index[battles[k][1]] for k in keep], dtype=np.intp)
    outcome = np.array([_OUTCOME[battles[k][2]] for k in keep], dtype=float)
    features = style_features([style[k] for k in keep]) if style is not None else None
    rows = contextual.build_rows(a, b, outcome, features, reweight=reweight, n_models=n)
    r, beta = contextual.fit(rows, n, prior_sd, style_reg)
    rating = _to_rating(r)
    if len(keep) == 0:
        lower = upper = rating
    elif ci == "sandwich":
        se, _ = contextual.sandwich(rows, n, r, beta, prior_sd, style_reg)
        lower, upper = rating - _Z95 * se, rating + _Z95 * se
    else:
        se, _ = contextual.sandwich(rows, n, r, beta, prior_sd, style_reg)
        lower, upper = rating - _Z95 * se, rating + _Z95 * se
        if bootstrap_rounds > 0:
            samples = _to_rating(contextual.bootstrap(rows, n, np.concatenate([r, beta]), prior_sd, style_reg,
                                                      bootstrap_rounds, seed))
            boot_lower, boot_upper = np.percentile(samples, [2.5, 97.5], axis=0)
            lower, upper = np.minimum(lower, boot_lower), np.maximum(upper, boot_upper)
    coefficients = dict(zip(STYLE_FEATURES, map(float, beta))) if style is not None else None
    return Board(_ranked_rows(models, counts.battles, rating, lower, upper, min_battles), coefficients, ci, reweight)


def win_rate_matrix(
    battles: Iterable[tuple[str, str, str]], models: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Return (models, matrix) with matrix[i, j] = share of i's games against j that i won.

    Ties count half. NaN where i and j never met, and on the diagonal. ``models`` fixes the
    order (e.g. leaderboard order) and may name models without battles; default is sorted names.
    """
    names, matrix, _ = win_rate_table(battles, models)
    return names, matrix


def win_rate_table(
    battles: Iterable[tuple[str, str, str]], models: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``win_rate_matrix`` plus games[i, j], the number of battles between i and j."""
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
    return names, matrix, games


def plot_win_rates(models: Sequence[str], matrix: np.ndarray, games: np.ndarray | None = None,
                   min_pair_battles: int = MIN_PAIR_BATTLES):
    """Heatmap of a win-rate matrix with each cell's value written in it (Agg, no pyplot).

    With ``games`` (battles per pair), a cell of fewer than ``min_pair_battles`` battles is not coloured
    by its rate: it is grey and says "n=3", as the table says "too few votes" for a provisional model
    (one vote would otherwise show as a certain 1.00 / 0.00). Above MAX_CELL_TEXTS models the values are
    written compactly (a percentage; a grey cell's battle count), and above
    MAX_COMPACT_TEXTS not at all (each text costs milliseconds to draw): the title says which.
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
    few = np.isfinite(data) & (np.asarray(games) < min_pair_battles) if games is not None else \
        np.zeros(data.shape, dtype=bool)
    ax.imshow(np.where(few, 1.0, np.nan), cmap="Greys", vmin=0.0, vmax=4.0)  # light grey under the few-battle cells
    image = ax.imshow(np.ma.masked_where(few | ~np.isfinite(data), data), cmap="RdBu", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=list(models), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(models))
    ax.set_xlabel("opponent")
    ax.set_ylabel("model")
    compact, written = n > MAX_CELL_TEXTS, n <= MAX_COMPACT_TEXTS
    title = f"Win rate{' (%)' if compact and written else ''} of row model\nagainst column model (ties count half)"
    if few.any():
        title += (f"\ngrey: fewer than {min_pair_battles} battles "
                  f"({'the number is' if compact else 'n ='} battles), too few votes")
    if not written:
        title += f"\n{n} models: colours only, the values are not written above {MAX_COMPACT_TEXTS} models"
    ax.set_title(title, fontsize=10)
    size = 9  # the cells keep their size as models are added (the figure grows), so a short text reads well
    for i in range(n if written else 0):
        for j in range(n):
            if few[i, j]:
                ax.text(j, i, f"{int(games[i, j])}" if compact else f"n={int(games[i, j])}", ha="center", va="center",
                        color="dimgray", fontsize=size - 1, fontstyle="italic")
            elif np.isfinite(data[i, j]):
                dark = abs(data[i, j] - 0.5) > 0.3
                ax.text(j, i, f"{100 * data[i, j]:.0f}" if compact else f"{data[i, j]:.2f}", ha="center", va="center",
                        color="white" if dark else "black", fontsize=size)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    if compact and written:  # the cells say percentages: so does the scale
        bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25", "50", "75", "100"])
    return fig
