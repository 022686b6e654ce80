"""The evaluation's statistics on generated judgments with known causes (no model, no judge, no network).

Covered: a judge that prefers longer answers gives the longer-answering model a high raw win rate and a
length-controlled one near 0.5; a real quality gap survives length control; per-category and per-turn
win rates carry bootstrap intervals; FastChat's per-model counting over several pairs.
"""

from __future__ import annotations

import numpy as np
import pytest

from vicuna_demo.evaluation.outputs import summarize
from vicuna_demo.evaluation.questions import parse_questions
from vicuna_demo.evaluation.runner import Answer, EvaluationResult, Judgment, model_pairs
from vicuna_demo.evaluation.statistics import length_controlled, model_records
from vicuna_demo.evaluation.verdicts import combine


def generated(n: int, *, length_bias: float, quality: float, seed: int = 0, categories=("writing", "math")):
    """n one-turn questions answered by "verbose" (about 700 characters) and "terse" (about 400), both with
    a spread; the judge prefers "verbose" with log-odds quality + length_bias * tanh(d / sd(d)), d the
    length difference, and the two answer orders always agree (no ties)."""
    rng = np.random.default_rng(seed)
    questions = parse_questions("\n".join(
        f'{{"question_id": {i}, "category": "{categories[i % len(categories)]}", "turns": ["q{i}"]}}'
        for i in range(n)))
    long = rng.normal(700, 250, n).clip(20).astype(int)
    short = rng.normal(400, 250, n).clip(20).astype(int)
    diff = long - short
    p = 1 / (1 + np.exp(-(quality + length_bias * np.tanh(diff / diff.std()))))
    wins = rng.random(n) < p
    answers = {"verbose": {}, "terse": {}}
    judgments = []
    for q, la, lb, won in zip(questions, long, short, wins):
        answers["verbose"][q.question_id] = Answer(question=q, model="verbose", turns=["v" * la])
        answers["terse"][q.question_id] = Answer(question=q, model="terse", turns=["t" * lb])
        verdict = combine("A", "B") if won else combine("B", "A")
        judgments.append(Judgment(question=q, turn=1, judge="J", prompt_name="p", model_a="verbose",
                                  model_b="terse", verdict=verdict))
    return questions, answers, judgments


def test_a_judge_that_prefers_longer_answers_loses_its_advantage_under_length_control():
    questions, answers, judgments = generated(400, length_bias=3.0, quality=0.0)
    raw = np.mean([j.outcome == "model_a" for j in judgments])
    controlled = length_controlled(judgments, answers)
    assert raw > 0.7                                       # the verbose model "wins" on length alone
    low, high = controlled["ci95"]
    assert low < 0.5 < high and abs(controlled["win_rate"] - 0.5) < 0.1
    assert controlled["length_coefficient"] > 2 and controlled["mean_chars_difference"] > 200
    assert controlled["n"] == 400


def test_a_real_quality_gap_survives_length_control():
    _, answers, judgments = generated(400, length_bias=0.0, quality=1.5, seed=1)
    raw = np.mean([j.outcome == "model_a" for j in judgments])
    controlled = length_controlled(judgments, answers)
    assert controlled["win_rate"] == pytest.approx(raw, abs=0.06) and controlled["ci95"][0] > 0.7
    assert abs(controlled["length_coefficient"]) < 0.6


def test_length_control_says_nothing_when_lengths_cannot_be_told_from_models():
    _, answers, judgments = generated(20, length_bias=0.0, quality=0.0)
    for q_id, answer in answers["verbose"].items():
        answer.turns = ["x" * (len(answers["terse"][q_id].turns[0]) + 10)]     # always exactly 10 longer
    assert length_controlled(judgments, answers)["win_rate"] is None
    assert length_controlled([], answers) == {"n": 0, "win_rate": None, "ci95": None, "length_coefficient": None,
                                              "mean_chars_difference": None}


def test_the_summary_gives_intervals_per_category_and_turn_and_length_control():
    questions, answers, judgments = generated(60, length_bias=3.0, quality=0.0)
    result = EvaluationResult(mode="pairwise", models=("verbose", "terse"), judge="J", questions=questions,
                              answers=answers, judgments=judgments, pairs=(("verbose", "terse"),))
    summary = summarize(result)
    for rows in (summary["by_category"], summary["by_turn"]):
        for row in rows.values():
            rates = row["win_rates"]
            assert rates["n"] == row["a_wins"] + row["b_wins"] + row["ties"]
            assert rates["ci95"][0] <= rates["win_rate_adjusted"] <= rates["ci95"][1]
    assert summary["length_controlled"]["win_rate"] < summary["a_win_rates"]["win_rate_adjusted"]
    assert summary["pairs"][0]["length_controlled"] == summary["length_controlled"]
    assert summary["lengths"]["verbose"]["chars_mean"] > summary["lengths"]["terse"]["chars_mean"]
    result.pairs = ()                                      # a result made the old way: A against B
    assert summarize(result)["a_win_rates"] == summary["a_win_rates"]


def test_per_model_records_count_every_pair_as_fastchat_does():
    q = parse_questions('{"question_id": 1, "turns": ["q"]}')[0]

    def game(a, b, g1, g2):
        return Judgment(question=q, turn=1, judge="J", prompt_name="p", model_a=a, model_b=b, verdict=combine(g1, g2))
    judgments = [game("x", "y", "A", "B"), game("x", "z", "A", "A"), game("y", "z", "B", "A"), game("x", "y", None, "A")]
    records = model_records(judgments)
    assert {m: (r["wins"], r["losses"], r["ties"]) for m, r in records.items()} == \
        {"x": (1, 0, 1), "z": (1, 0, 1), "y": (0, 2, 0)}
    assert records["x"]["win_rate_adjusted"] == 0.75 and records["y"]["ci95"] == [0.0, 0.0]
    assert "z" not in model_records(judgments, baseline="z")
    assert model_pairs(["x", "y", "z"]) == [("x", "y"), ("x", "z"), ("y", "z")]
    assert model_pairs(["x", "y", "z"], "baseline", "y") == [("x", "y"), ("z", "y")]
    with pytest.raises(ValueError, match="not one of the models"):
        model_pairs(["x", "y"], "baseline", "w")
