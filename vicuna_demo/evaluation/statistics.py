"""The numbers an evaluation's summary reports, as pure functions over judgments and answers (numpy/scipy).

- ``win_rates``: FastChat's pairwise rates for model A (show_result.py's counting: the two answer orders
  disagreeing is a tie) with a 95% percentile bootstrap interval over the judged turns.
- ``model_records``: per model over all its pairs (FastChat's pairwise-all / pairwise-baseline table).
- ``length_controlled``: AlpacaEval 2's idea for one pair: a logistic regression of the judge's preference
  on the model identity and the answers' normalised length difference, read at zero difference.
- ``answer_lengths``, ``mean_interval``: per-model answer lengths; a mean grade with its t-interval.

Each turn of a question is one game (MT-Bench judges the second turn on its own). The bootstrap resamples
turns, so the two turns of a question count as independent: with few questions an interval is too
narrow rather than too wide (see docs/evaluation.md, "Statistics").
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from ..data.contextual import LN10, bootstrap, build_rows, fit
from ..data.ratings import PRIOR_SD, STYLE_REG
from .runner import EvaluationResult, Judgment

BOOTSTRAP_ROUNDS = 1000
LC_BOOTSTRAP_ROUNDS = 300          # each round refits the regression
SCORE = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5}   # for model A; "no_verdict" is left out


def mean_interval(scores: list[float]) -> tuple[float | None, list[float] | None]:
    """Mean and its 95% t-interval (None without scores; no interval from a single score)."""
    if not scores:
        return None, None
    mean = math.fsum(scores) / len(scores)
    if len(scores) < 2:
        return mean, None
    from scipy import stats
    sem = stats.sem(scores)
    if sem == 0:
        return mean, [mean, mean]
    low, high = stats.t.interval(0.95, len(scores) - 1, loc=mean, scale=sem)
    return mean, [round(float(low), 3), round(float(high), 3)]


def pair_counts(judgments: Sequence[Judgment]) -> dict:
    outcomes = Counter(j.outcome for j in judgments)
    return {"a_wins": outcomes["model_a"], "b_wins": outcomes["model_b"], "ties": outcomes["tie"],
            "no_verdict": outcomes["no_verdict"]}


def _rates(scores: np.ndarray, rounds: int, seed: int) -> dict:
    """win / loss / adjusted rates of 1 / 0 / 0.5 scores, with a 95% percentile bootstrap interval."""
    if not len(scores):
        return {"n": 0, "win_rate": None, "loss_rate": None, "win_rate_adjusted": None, "ci95": None}
    samples = np.random.default_rng(seed).choice(scores, size=(rounds, len(scores)), replace=True).mean(axis=1)
    low, high = np.percentile(samples, [2.5, 97.5])
    return {"n": int(len(scores)), "win_rate": round(float((scores == 1.0).mean()), 4),
            "loss_rate": round(float((scores == 0.0).mean()), 4),
            "win_rate_adjusted": round(float(scores.mean()), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}


def win_rates(judgments: Sequence[Judgment], rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict:
    """FastChat's pairwise rates for model A over the judged turns with a verdict: ``win_rate`` = wins / n,
    ``loss_rate``, and ``win_rate_adjusted`` = (wins + ties / 2) / n, with a 95% percentile bootstrap
    interval over the judged turns."""
    return _rates(np.array([SCORE[j.outcome] for j in judgments if j.outcome in SCORE]), rounds, seed)


def model_records(judgments: Sequence[Judgment], baseline: str | None = None, rounds: int = BOOTSTRAP_ROUNDS,
                  seed: int = 0) -> dict:
    """model -> its wins, losses and ties over every pair it played, and the rates of ``_rates`` (FastChat's
    show_result.py --mode pairwise-all; the baseline left out as in its pairwise-baseline)."""
    scores: dict[str, list[float]] = {}
    for j in judgments:
        if j.outcome in SCORE:
            scores.setdefault(j.model_a, []).append(SCORE[j.outcome])
            scores.setdefault(j.model_b, []).append(1.0 - SCORE[j.outcome])
    records = {}
    for model, mine in scores.items():
        if model == baseline:
            continue
        values = np.array(mine)
        records[model] = {"wins": int((values == 1.0).sum()), "losses": int((values == 0.0).sum()),
                          "ties": int((values == 0.5).sum()), **_rates(values, rounds, seed)}
    return dict(sorted(records.items(), key=lambda kv: -kv[1]["win_rate_adjusted"]))


def turn_chars(answers: Mapping[str, Mapping], model: str, judgment: Judgment) -> int:
    """Characters of ``model``'s answer to the judged turn (the turn the judge is asked about)."""
    answer = answers.get(model, {}).get(judgment.question.question_id)
    turns = answer.turns if answer is not None else []
    return len(turns[judgment.turn - 1]) if len(turns) >= judgment.turn else 0


def length_controlled(judgments: Sequence[Judgment], answers: Mapping[str, Mapping],
                      rounds: int = LC_BOOTSTRAP_ROUNDS, seed: int = 0) -> dict:
    """Model A's length-controlled win rate against B over one pair's judged turns (AlpacaEval 2's idea):

        logit P(judge prefers A) = theta + phi * tanh(d / sd(d)),   d = chars(A's answer) - chars(B's answer)

    fitted by the project's contextual Bradley-Terry fit (data/contextual.py: a tie is half a win, a weak
    prior, a tiny L2 penalty on phi) with the length term as its one, uncentred, feature; the
    length-controlled win rate is sigmoid(theta): the preference predicted at equal lengths. 95% interval:
    percentile bootstrap over the judged turns, refitting each round. ``win_rate`` is None when the
    length difference never varies (length and model cannot be told apart) or nothing was judged."""
    judged = [j for j in judgments if j.outcome in SCORE]
    base = {"n": len(judged), "win_rate": None, "ci95": None, "length_coefficient": None,
            "mean_chars_difference": None}
    if not judged:
        return base
    diff = np.array([turn_chars(answers, j.model_a, j) - turn_chars(answers, j.model_b, j) for j in judged], float)
    base["mean_chars_difference"] = round(float(diff.mean()), 1)
    spread = float(diff.std())
    if spread == 0 and diff.any():
        return base
    feature = np.tanh(diff / spread) if spread else np.zeros_like(diff)
    outcome = np.array([SCORE[j.outcome] for j in judged])
    rows = build_rows(np.zeros(len(judged)), np.ones(len(judged)), outcome, feature[:, None], n_models=2)
    r, beta = fit(rows, 2, PRIOR_SD, STYLE_REG)
    theta = LN10 * (r[0] - r[1])
    samples = bootstrap(rows, 2, np.concatenate([r, beta]), PRIOR_SD, STYLE_REG, rounds, seed)
    low, high = np.percentile(_sigmoid(LN10 * (samples[:, 0] - samples[:, 1])), [2.5, 97.5])
    return {**base, "win_rate": round(float(_sigmoid(theta)), 4), "ci95": [round(float(low), 4), round(float(high), 4)],
            "length_coefficient": round(float(beta[0]), 4)}


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def answer_lengths(result: EvaluationResult) -> dict:
    """Per model, over its complete answers (all turns): how many, mean tokens, mean and median characters,
    and how many were cut at the token limit (a finish reason "length"). Judges prefer longer answers:
    read a verdict with these beside it (and the length-controlled win rate)."""
    lengths = {}
    for model, answers in result.answers.items():
        done = [a for a in answers.values() if a.complete]
        chars = sorted(sum(len(t) for t in a.turns) for a in done)
        tokens = [a.n_tokens for a in done if a.n_tokens]
        lengths[model] = {
            "answers": len(done), "missing": len(answers) - len(done),
            "tokens_mean": round(math.fsum(tokens) / len(tokens), 1) if tokens else None,
            "chars_mean": round(math.fsum(chars) / len(chars), 1) if chars else None,
            "chars_median": chars[len(chars) // 2] if chars else None,
            "cut_at_limit": sum(1 for a in done if "length" in a.finish_reasons)}
    return lengths
