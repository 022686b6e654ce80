"""Contextual Bradley-Terry: ratings fitted together with style coefficients, optional pair reweighting,
and sandwich (closed-form) or bootstrap intervals (pure numpy/scipy; ratings.py calls it).

Model, in ratings.py's units (a rating R = 400 r + 1000):

    logit P(A beats B) = ln(10) (r_A - r_B) + x . beta

where x is the battle's normalised style features (style.py; none for a plain fit) and beta the style
coefficients, in natural-log-odds per standard deviation of a feature (the unit LMArena's ``arena-rank``
reports). A tie counts half a win for each side. The loss is the weighted mean over battles of the
logistic loss, plus ratings.py's weak Gaussian prior on r (sum(r^2) / (2 tau^2), divided by the number
of battles) and an L2 penalty ``0.5 * style_reg * |beta|^2`` on the style coefficients only, with
``arena-rank``'s scale: as the loss is a mean, ``style_reg`` does not fade with more battles.

Rows: battles that share (model A, model B, outcome) and carry no features are one row with a count, so
a plain fit of 100k battles costs no more than a few hundred rows; with features each battle is a row.

Reweighting (LMArena's rule): a battle of a pair with n battles weighs 1 / max(n, 50), the weights
scaled to mean 1, so that pairs the arena sampled often do not dominate the fit.

Sandwich intervals: the covariance of the estimate is H^-1 G H^-1, with H the curvature of the summed
penalised loss and G the summed outer products of each battle's gradient; the common shift of the
ratings (set only by the prior) is projected out before the standard errors are read.
Bootstrap intervals: battles resampled with replacement (one multinomial draw over the rows per round)
and the fit repeated; percentile 2.5 / 97.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LN10 = math.log(10.0)
SCALE = 400.0
MIN_PAIR_COUNT = 50  # LMArena's floor in 1 / max(battles of the pair, 50)


@dataclass(frozen=True)
class Rows:
    """Battles as rows: model indices, outcome for A (1, 0.5, 0), battle count, per-battle weight, features."""

    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray
    count: np.ndarray
    weight: np.ndarray
    features: np.ndarray  # (rows, k); k = 0 for a plain fit

    @property
    def battles(self) -> float:
        return float(self.count.sum())


def build_rows(a: np.ndarray, b: np.ndarray, outcome: np.ndarray, features: np.ndarray | None = None,
               reweight: bool = False, n_models: int | None = None) -> Rows:
    """Rows from per-battle arrays (a != b); battles without features are grouped per (a, b, outcome)."""
    a, b, outcome = np.asarray(a, np.intp), np.asarray(b, np.intp), np.asarray(outcome, float)
    n = len(a)
    n_models = int(max(a.max(initial=-1), b.max(initial=-1)) + 1) if n_models is None else n_models
    weight = np.ones(n)
    if reweight and n:
        pair = np.minimum(a, b) * n_models + np.maximum(a, b)
        _, inverse, per_pair = np.unique(pair, return_inverse=True, return_counts=True)
        weight = 1.0 / np.maximum(per_pair[inverse], MIN_PAIR_COUNT)
        weight = weight / weight.mean()
    if features is not None:
        features = np.asarray(features, float).reshape(n, -1)
        return Rows(a, b, outcome, np.ones(n), weight, features)
    if n == 0:
        return Rows(a, b, outcome, np.ones(0), weight, np.zeros((0, 0)))
    key = (a * n_models + b) * 3 + np.round(outcome * 2).astype(np.intp)  # (a, b, outcome) as one integer
    unique, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
    # every battle of a row belongs to one pair, so they share one weight
    row_weight = np.zeros(len(unique))
    row_weight[inverse.reshape(-1)] = weight
    pair, half_points = np.divmod(unique, 3)
    first, second = np.divmod(pair, n_models)
    return Rows(first, second, half_points / 2.0, count.astype(float), row_weight, np.zeros((len(unique), 0)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _logits(rows: Rows, r: np.ndarray, beta: np.ndarray) -> np.ndarray:
    z = LN10 * (r[rows.a] - r[rows.b])
    if beta.size:
        z = z + rows.features @ beta
    return z


def _penalised(rows: Rows, n_models: int, v: np.ndarray, share: np.ndarray, prior: float,
               style_reg: float) -> float:
    r, beta = v[:n_models], v[n_models:]
    z = _logits(rows, r, beta)
    return (float(share @ (np.logaddexp(0.0, z) - rows.outcome * z)) + prior * float(r @ r)
            + 0.5 * style_reg * float(beta @ beta))


def fit(rows: Rows, n_models: int, prior_sd: float, style_reg: float, start: np.ndarray | None = None,
        count: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(r with mean 0, beta) minimising the penalised mean loss; ``count`` overrides the rows' counts
    (a bootstrap draw).

    Newton's method with a backtracking line search: the loss is convex and, with the prior, strictly
    so; there are only n_models + k parameters, so each step solves the exact curvature and a fit
    takes about ten passes over the rows whatever their number.
    """
    k = rows.features.shape[1]
    count = rows.count if count is None else count
    total = float(count.sum())
    v = np.zeros(n_models + k) if start is None else np.array(start, dtype=float)
    if n_models < 2 or total <= 0:
        return np.zeros(n_models), np.zeros(k)
    share = count * rows.weight / total
    prior = 1.0 / (2.0 * (prior_sd / SCALE) ** 2 * total)
    curvature = np.concatenate([np.full(n_models, 2.0 * prior), np.full(k, float(style_reg))])
    loss = _penalised(rows, n_models, v, share, prior, style_reg)
    for _ in range(100):
        r, beta = v[:n_models], v[n_models:]
        z = _logits(rows, r, beta)
        p = _sigmoid(z)
        dz = share * (p - rows.outcome)
        grad = np.concatenate([LN10 * (np.bincount(rows.a, dz, n_models) - np.bincount(rows.b, dz, n_models)),
                               rows.features.T @ dz if k else np.zeros(0)]) + curvature * v
        hessian = _blocks(rows, n_models, share * p * (1.0 - p)) + np.diag(curvature)
        step = np.linalg.solve(hessian, grad)
        t = 1.0
        while True:
            candidate = v - t * step
            new_loss = _penalised(rows, n_models, candidate, share, prior, style_reg)
            if new_loss <= loss + 1e-4 * t * float(grad @ -step) or t < 1e-8:
                break
            t *= 0.5
        if new_loss > loss:  # no descent left at machine precision: v is the minimum
            break
        v, improvement, loss = candidate, loss - new_loss, new_loss
        if float(np.max(np.abs(t * step))) < 1e-10 or improvement < 1e-16:
            break
    r = v[:n_models]
    return r - r.mean(), v[n_models:]


def _pairwise(n: int, a: np.ndarray, b: np.ndarray, values: np.ndarray) -> np.ndarray:
    diagonal = np.bincount(a, values, n) + np.bincount(b, values, n)
    off = np.bincount(a * n + b, values, n * n).reshape(n, n)
    return np.diag(diagonal) - off - off.T


def _blocks(rows: Rows, n_models: int, per_row: np.ndarray) -> np.ndarray:
    """Sum over rows of per_row * g g^T, with g = (ln10 (e_a - e_b), x): the (n + k) square matrix."""
    k = rows.features.shape[1]
    out = np.zeros((n_models + k, n_models + k))
    out[:n_models, :n_models] = LN10**2 * _pairwise(n_models, rows.a, rows.b, per_row)
    if k:
        weighted = per_row[:, None] * rows.features
        cross = np.stack([np.bincount(rows.a, weighted[:, j], n_models) - np.bincount(rows.b, weighted[:, j], n_models)
                          for j in range(k)], axis=1) * LN10
        out[:n_models, n_models:] = cross
        out[n_models:, :n_models] = cross.T
        out[n_models:, n_models:] = rows.features.T @ weighted
    return out


def sandwich(rows: Rows, n_models: int, r: np.ndarray, beta: np.ndarray, prior_sd: float,
             style_reg: float) -> tuple[np.ndarray, np.ndarray]:
    """(rating standard errors in rating points, beta standard errors) from H^-1 G H^-1."""
    k = rows.features.shape[1]
    p = _sigmoid(_logits(rows, r, beta))
    hessian = _blocks(rows, n_models, rows.count * rows.weight * p * (1.0 - p))
    hessian[:n_models, :n_models] += np.eye(n_models) / (prior_sd / SCALE) ** 2
    hessian[n_models:, n_models:] += style_reg * rows.battles * np.eye(k)
    gradients = _blocks(rows, n_models, rows.count * (rows.weight * (rows.outcome - p)) ** 2)
    inverse = np.linalg.inv(hessian)
    covariance = inverse @ gradients @ inverse
    center = np.eye(n_models) - 1.0 / n_models
    rating_cov = center @ covariance[:n_models, :n_models] @ center
    rating_se = SCALE * np.sqrt(np.clip(np.diag(rating_cov), 0.0, None))
    beta_se = np.sqrt(np.clip(np.diag(covariance)[n_models:], 0.0, None))
    return rating_se, beta_se


def bootstrap(rows: Rows, n_models: int, start: np.ndarray, prior_sd: float, style_reg: float, rounds: int,
              seed: int | None) -> np.ndarray:
    """(rounds, n_models) refitted r values, battles resampled with replacement."""
    rng = np.random.default_rng(seed)
    total = int(rows.battles)
    draws = rng.multinomial(total, rows.count / total, size=rounds).astype(float)
    samples = np.empty((rounds, n_models))
    for i, draw in enumerate(draws):
        samples[i], _ = fit(rows, n_models, prior_sd, style_reg, start, count=draw)
    return samples
