"""What an evaluation leaves behind: FastChat's files, a summary, and its table and plot.

``write_outputs(result, out_dir)`` lays the folder out like one of FastChat's benchmark folders, so
its scripts read it (e.g. ``python -m fastchat.llm_judge.show_result --input-file
OUT/model_judgment/JUDGE_pair.jsonl --mode pairwise-all``):

    OUT/question.jsonl                      the questions, in FastChat's question format
    OUT/model_answer/<model>.jsonl          question_id, answer_id, model_id, choices[{index, turns}], tstamp
                                            (+ generate_params; "error" when an answer is missing)
    OUT/model_judgment/<judge>_pair.jsonl   question_id, model_1, model_2, g1_winner, g2_winner, judge
                                            [name, prompt], g1/g2_user_prompt, g1/g2_judgment, turn, tstamp
    OUT/model_judgment/<judge>_single.jsonl question_id, model, judge, user_prompt, judgment, score, turn, tstamp
    OUT/summary.json                        ``summarize(result)``

Winners in the judgment files are FastChat's: "model_1", "model_2", "tie", or "error" for no verdict
(FastChat's scripts leave such rows out, as the summary does); a missing grade is score -1.
Each turn of a question is one game (MT-Bench judges the second turn on its own), so a two-turn
question counts twice in the totals. With more than two models the judgment file holds every pair (FastChat's
pairwise-all or pairwise-baseline files have the same shape). The statistics are in ``statistics.py``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import Counter
from pathlib import Path

from .questions import Question
from .verdicts import PairVerdict
from .runner import Answer, EvaluationResult, Judgment, model_pairs
from .statistics import (answer_lengths, length_controlled, mean_interval, model_records, pair_counts,
                         win_rates)

_FASTCHAT_WINNER = {"model_a": "model_1", "model_b": "model_2", "tie": "tie", None: "error"}


def safe_name(name: str) -> str:
    """A model name as a file name: path separators and control characters replaced, nothing else."""
    cleaned = re.sub(r"[\\/\x00-\x1f:*?\"<>|]", "_", name).strip(" .")
    return cleaned or "model"


def _sort_key(question_id) -> tuple:
    return (0, question_id, "") if isinstance(question_id, int) else (1, 0, str(question_id))


# -- summary ------------------------------------------------------------------------------------
def problems(result: EvaluationResult) -> list[str]:
    """Everything that did not go as planned, one line each (missing answers, judge failures...)."""
    lines = []
    if result.cancelled:
        lines.append("The evaluation was cancelled before it finished.")
    for model, answers in result.answers.items():
        missing = [a for a in answers.values() if not a.complete]
        if missing:
            reasons = Counter(a.error or "incomplete" for a in missing)
            lines.append(f"{model}: {len(missing)} question(s) without a complete answer ("
                         + "; ".join(f"{n} × {why}" for why, n in reasons.most_common(3)) + ").")
    if result.skipped:
        lines.append(f"{len(result.skipped)} turn(s) not judged because an answer is missing.")
    failed = [j for j in result.judgments if j.error]
    if failed:
        reasons = Counter(j.error for j in failed)
        lines.append(f"The judge {result.judge} failed on {len(failed)} of {len(result.judgments)} judgment(s) ("
                     + "; ".join(f"{n} × {why}" for why, n in reasons.most_common(3)) + ").")
    unparsed = [j for j in result.judgments if not j.error and j.outcome == "no_verdict"]
    if unparsed:
        lines.append(f"{len(unparsed)} judgment(s) gave no well-formed verdict (counted as no verdict).")
    return lines


def pair_summary(judgments: list[Judgment], answers: dict, a: str, b: str, categories: list[str]) -> dict:
    """One pair's counts, win rates with a bootstrap interval (overall, per category and per turn) and its
    length-controlled win rate, all for model A."""
    mine = [j for j in judgments if (j.model_a, j.model_b) == (a, b)]

    def counted(chosen: list[Judgment]) -> dict:
        return {**pair_counts(chosen), "win_rates": win_rates(chosen)}
    return {"a": a, "b": b, "games": len(mine), **pair_counts(mine),
            "orders_disagree": sum(1 for j in mine if j.verdict and j.verdict.orders_disagree),
            "by_category": {c: counted([j for j in mine if j.question.category == c]) for c in categories},
            "by_turn": {str(t): counted([j for j in mine if j.turn == t]) for t in sorted({j.turn for j in mine})},
            "a_win_rates": win_rates(mine), "length_controlled": length_controlled(mine, answers)}


def summarize(result: EvaluationResult) -> dict:
    """The numbers ``--json`` prints: win/tie counts (pairwise) or mean grades with 95% intervals (single).

    Pairwise: ``pairs`` has one entry per pair judged (``pair_summary``) and ``by_model`` each model's record
    over all its pairs (FastChat's show_result table); with one pair its entry's keys are also at the top
    (``a``, ``b``, ``a_wins`` ...); with several, ``by_category`` is model -> adjusted win rate per category."""
    categories = sorted({q.category for q in result.questions})
    base = {"mode": result.mode, "judge": result.judge, "questions": len(result.questions),
            "games": len(result.judgments)}
    if result.mode == "answers":
        summary = {**base, "models": answer_lengths(result), "by_category": {}}
    elif result.mode == "pairwise":
        judged = result.pairs or model_pairs(result.models)      # a result made without pairs: every pair
        pairs = [pair_summary(result.judgments, result.answers, a, b, categories) for a, b in judged]
        summary = {**base, "models_compared": list(result.models), "baseline": result.baseline, "pairs": pairs,
                   "by_model": model_records(result.judgments, result.baseline)}
        if len(pairs) == 1:
            summary = {**{k: v for k, v in pairs[0].items() if k in ("a", "b")}, **summary,
                       **{k: v for k, v in pairs[0].items() if k not in ("a", "b", "games")}}
        else:
            summary["by_category"] = {
                c: {m: row["win_rate_adjusted"] for m, row in model_records(
                    [j for j in result.judgments if j.question.category == c], result.baseline, rounds=1).items()}
                for c in categories}
    else:
        models = {}
        for model in result.models:
            mine = [j for j in result.judgments if j.model_a == model]
            mean, interval = mean_interval([j.score for j in mine if j.score is not None])
            models[model] = {"mean": None if mean is None else round(mean, 3), "ci95": interval,
                             "n": sum(1 for j in mine if j.score is not None),
                             "no_verdict": sum(1 for j in mine if j.score is None)}
        by_category = {}
        for c in categories:
            by_category[c] = {}
            for model in result.models:
                scores = [j.score for j in result.judgments
                          if j.model_a == model and j.question.category == c and j.score is not None]
                by_category[c][model] = round(math.fsum(scores) / len(scores), 3) if scores else None
        summary = {**base, "models": models, "by_category": by_category}
    summary["lengths"] = answer_lengths(result)
    summary["timing_s"] = {"answers": round(result.answer_s, 2), "judgments": round(result.judge_s, 2)}
    summary["problems"] = problems(result)
    return summary


# -- FastChat files -----------------------------------------------------------------------------
def answer_record(answer) -> dict:
    turns = list(answer.turns) + [""] * (len(answer.question.turns) - len(answer.turns))
    record = {"question_id": answer.question.question_id, "answer_id": uuid.uuid4().hex[:22],
              "model_id": answer.model, "choices": [{"index": 0, "turns": turns}], "tstamp": answer.tstamp,
              "generate_params": answer.params, "n_tokens": answer.n_tokens,
              "finish_reasons": list(answer.finish_reasons)}
    if not answer.complete:
        record["error"] = answer.error or "incomplete"
    return record


def judgment_record(j: Judgment) -> dict:
    common = {"question_id": j.question.question_id, "category": j.question.category}
    if j.pairwise:
        verdict = j.verdict
        record = {**common, "model_1": j.model_a, "model_2": j.model_b,
                  "g1_winner": _FASTCHAT_WINNER[verdict.g1 if verdict else None],
                  "g2_winner": _FASTCHAT_WINNER[verdict.g2 if verdict else None],
                  "judge": [j.judge, j.prompt_name], "g1_user_prompt": j.g1_prompt, "g1_judgment": j.g1_text,
                  "g2_user_prompt": j.g2_prompt, "g2_judgment": j.g2_text, "turn": j.turn, "tstamp": j.tstamp}
    else:
        record = {**common, "model": j.model_a, "judge": [j.judge, j.prompt_name], "user_prompt": j.g1_prompt,
                  "judgment": j.g1_text, "score": -1 if j.score is None else j.score, "turn": j.turn,
                  "tstamp": j.tstamp}
    if j.error:
        record["error"] = j.error
    return record


# -- reading earlier runs back (reuse and resume) ----------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; unreadable lines are skipped (a run cut off mid-line)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def answer_file(folder: str | Path, model: str) -> Path:
    """Where a model's answers are in a FastChat benchmark folder (or in its model_answer/ folder itself)."""
    folder = Path(folder)
    inside = folder / "model_answer" if (folder / "model_answer").is_dir() else folder
    return inside / f"{safe_name(model)}.jsonl"


def read_answers(folder: str | Path, model: str, questions: list[Question]) -> dict:
    """question_id -> Answer from FastChat's ``model_answer/<model>.jsonl`` (ours or FastChat's): the
    first choice's turns of each question asked. Records with ``error`` or empty turns are incomplete
    (asked again); records of other questions are ignored."""
    by_id = {q.question_id: q for q in questions}
    answers = {}
    for record in _read_jsonl(answer_file(folder, model)):
        question = by_id.get(record.get("question_id"))
        choices = record.get("choices")
        if question is None or not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            continue
        turns = choices[0].get("turns")
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            continue
        done = [t for t in turns[:len(question.turns)] if t]
        answers[question.question_id] = Answer(
            question=question, model=model, params=record.get("generate_params") or {}, turns=done,
            finish_reasons=list(record.get("finish_reasons") or []), n_tokens=int(record.get("n_tokens") or 0),
            error=record.get("error") or (None if len(done) == len(question.turns) else "incomplete"),
            tstamp=float(record.get("tstamp") or 0.0))
    return answers


def read_references(path: str | Path) -> dict:
    """question_id -> reference answer turns from a reference-answer file in FastChat's answer format
    (``data/mt_bench/reference_answer/gpt-4.jsonl``: ``choices[0].turns``). Raises OSError / ValueError
    when the file cannot be read or holds no usable record."""
    path = Path(path)
    if not path.is_file():
        raise OSError(f"{path}: no such file")
    references = {}
    for record in _read_jsonl(path):
        choices = record.get("choices")
        if "question_id" not in record or not isinstance(choices, list) or not choices:
            continue
        turns = choices[0].get("turns") if isinstance(choices[0], dict) else None
        if isinstance(turns, list) and all(isinstance(t, str) for t in turns):
            references[record["question_id"]] = tuple(turns)
    if not references:
        raise ValueError(f"{path}: no reference answers in FastChat's format "
                         '({"question_id": ..., "choices": [{"turns": [...]}]} per line)')
    return references


_FROM_FASTCHAT = {"model_1": "model_a", "model_2": "model_b", "tie": "tie"}


def judgment_file(folder: str | Path, judge: str, mode: str) -> Path:
    return Path(folder) / "model_judgment" / f"{safe_name(judge)}_{'pair' if mode == 'pairwise' else 'single'}.jsonl"


def read_judgments(folder: str | Path, judge: str, mode: str, questions: list[Question]) -> dict:
    """Judgment.key -> Judgment from an earlier run's ``model_judgment`` file (the same judge and mode); the
    texts are kept so the verdicts are read again by today's rules."""
    by_id = {q.question_id: q for q in questions}
    judgments = {}
    for record in _read_jsonl(judgment_file(folder, judge, mode)):
        question = by_id.get(record.get("question_id"))
        name = record.get("judge")
        if question is None or not isinstance(name, list) or len(name) != 2 or name[0] != judge:
            continue
        common = dict(question=question, turn=int(record.get("turn") or 1), judge=judge, prompt_name=str(name[1]),
                      error=record.get("error"), tstamp=float(record.get("tstamp") or 0.0))
        if mode == "pairwise":
            judgment = Judgment(**common, model_a=str(record.get("model_1")), model_b=str(record.get("model_2")),
                                g1_prompt=str(record.get("g1_user_prompt") or ""),
                                g1_text=str(record.get("g1_judgment") or ""),
                                g2_prompt=str(record.get("g2_user_prompt") or ""),
                                g2_text=str(record.get("g2_judgment") or ""))
            g1, g2 = (_FROM_FASTCHAT.get(record.get(k)) for k in ("g1_winner", "g2_winner"))
            judgment.verdict = PairVerdict(g1=g1, g2=g2)
        else:
            judgment = Judgment(**common, model_a=str(record.get("model")), g1_prompt=str(record.get("user_prompt") or ""),
                                g1_text=str(record.get("judgment") or ""))
            score = record.get("score")
            judgment.score = float(score) if isinstance(score, (int, float)) and score >= 0 else None
        judgments[judgment.key] = judgment
    return judgments


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_outputs(result: EvaluationResult, out_dir: str | Path, summary: dict | None = None) -> list[Path]:
    """Write the files listed in the module docstring; return their paths. Raises OSError."""
    out = Path(out_dir)
    written = []
    path = out / "question.jsonl"
    _write_jsonl(path, (q.as_dict() for q in result.questions))
    written.append(path)
    for model, answers in result.answers.items():
        path = out / "model_answer" / f"{safe_name(model)}.jsonl"
        _write_jsonl(path, (answer_record(answers[k]) for k in sorted(answers, key=_sort_key)))
        written.append(path)
    if result.judgments:
        kind = "pair" if result.mode == "pairwise" else "single"
        path = out / "model_judgment" / f"{safe_name(result.judge)}_{kind}.jsonl"
        _write_jsonl(path, (judgment_record(j) for j in result.judgments))
        written.append(path)
    path = out / "summary.json"
    path.write_text(json.dumps(summary or summarize(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(path)
    return written


# -- for people -----------------------------------------------------------------------------------
def category_table(summary: dict, intervals: bool = False) -> tuple[list[str], list[list]]:
    """(headers, rows): per category, then "all" (answers only: per model, its answers' lengths); ``intervals``
    adds model A's win rate with its 95% bootstrap interval to a pair's rows (the terminal's table)."""
    if summary["mode"] == "answers":
        keys = ("answers", "missing", "tokens_mean", "chars_mean", "chars_median", "cut_at_limit")
        return ["model", *keys], [[m] + [row[k] for k in keys] for m, row in summary["models"].items()]
    if summary["mode"] == "pairwise" and "a" in summary:
        headers = ["category", f"{summary['a']} wins", f"{summary['b']} wins", "ties", "no verdict"]
        keys = ("a_wins", "b_wins", "ties", "no_verdict")
        rows = [[c] + [counts[k] for k in keys] for c, counts in summary["by_category"].items()]
        rows.append(["all"] + [summary[k] for k in keys])
        if intervals:
            headers.append(f"{summary['a']} win rate (95% CI)")
            for row, rates in zip(rows, [c.get("win_rates") for c in summary["by_category"].values()]
                                  + [summary.get("a_win_rates")]):
                row.append(rate_text(rates))
        return headers, rows
    if summary["mode"] == "pairwise":
        models = list(summary["by_model"])
        headers = ["category"] + [f"{m} win rate" for m in models]
        rows = [[c] + [rates.get(m) for m in models] for c, rates in summary["by_category"].items()]
        rows.append(["all"] + [summary["by_model"][m]["win_rate_adjusted"] for m in models])
        return headers, rows
    models = list(summary["models"])
    headers = ["category"] + [f"{m} mean" for m in models]
    rows = [[c] + [scores[m] for m in models] for c, scores in summary["by_category"].items()]
    rows.append(["all"] + [summary["models"][m]["mean"] for m in models])
    return headers, rows


def rate_text(rates: dict | None) -> str:
    """"0.700 (0.450-0.900)": a rate with its 95% interval, or "-"."""
    if not rates or rates.get("win_rate_adjusted", rates.get("win_rate")) is None:
        return "-"
    value = rates.get("win_rate_adjusted", rates.get("win_rate"))
    return f"{value:.3f}" + (f" ({rates['ci95'][0]:.3f}-{rates['ci95'][1]:.3f})" if rates.get("ci95") else "")


def _pair_lines(pair: dict) -> list[str]:
    lines = [f"  {pair['a']} wins {pair['a_wins']} · {pair['b']} wins {pair['b_wins']} · ties {pair['ties']} "
             f"({pair['orders_disagree']} of them because the orders disagreed) · no verdict {pair['no_verdict']}"]
    rates = pair.get("a_win_rates") or {}
    if rates.get("ci95"):
        lines.append(f"  {pair['a']}'s win rate (ties as half) {rate_text(rates)} (95% bootstrap interval) over "
                     f"{rates['n']} judged turns")
    controlled = pair.get("length_controlled") or {}
    if controlled.get("win_rate") is not None:
        lines.append(f"  length-controlled {rate_text(controlled)}; {pair['a']}'s answers are "
                     f"{controlled['mean_chars_difference']:+g} characters longer on average")
    return lines


def format_summary(summary: dict) -> str:
    """A few lines for a terminal."""
    if summary["mode"] == "answers":
        lines = [f"Answers only (no judge): {summary['questions']} questions."]
    elif summary["mode"] == "pairwise" and "a" in summary:
        lines = [f"{summary['a']} vs {summary['b']}, judged by {summary['judge']}: {summary['questions']} questions, "
                 f"{summary['games']} judged turns (both answer orders each).", *_pair_lines(summary)]
    elif summary["mode"] == "pairwise":
        against = f"each against {summary['baseline']}" if summary.get("baseline") else "every pair"
        lines = [f"{len(summary['models_compared'])} models, {against}, judged by {summary['judge']}: "
                 f"{summary['questions']} questions, {summary['games']} judged turns (both answer orders each)."]
        for pair in summary["pairs"]:
            lines += [f"{pair['a']} vs {pair['b']}:", *_pair_lines(pair)]
        lines.append("Per model over all its pairs (win rate, ties as half, 95% bootstrap interval):")
        lines += [f"  {m}: {rate_text(row)} · wins {row['wins']} · losses {row['losses']} · ties {row['ties']}"
                  for m, row in summary["by_model"].items()]
    else:
        lines = [f"Single-answer grading (1-10) by {summary['judge']}: {summary['questions']} questions."]
        for model, row in summary["models"].items():
            interval = f" (95% CI {row['ci95'][0]:.2f}-{row['ci95'][1]:.2f})" if row["ci95"] else ""
            mean = "no grades" if row["mean"] is None else f"mean {row['mean']:.2f}{interval}"
            lines.append(f"  {model}: {mean} over {row['n']} graded turns, no verdict {row['no_verdict']}")
    headers, rows = category_table(summary, intervals=True)
    width = max(len(str(r[0])) for r in rows + [headers])
    lines.append("  " + " | ".join([headers[0].ljust(width)] + headers[1:]))
    for row in rows:
        lines.append("  " + " | ".join([str(row[0]).ljust(width)] + ["-" if v is None else f"{v}" for v in row[1:]]))
    lines += [f"  ! {p}" for p in summary["problems"]]
    return "\n".join(lines)


def plot_summary(summary: dict):
    """A matplotlib figure: per category, stacked win/tie/loss shares (pairwise) or mean grades (single)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7, 3.6), layout="constrained")
    ax = figure.add_subplot()
    categories = list(summary["by_category"])
    if summary["mode"] == "pairwise" and "a" in summary:
        left = [0.0] * len(categories)
        for key, label, color in (("a_wins", f"{summary['a']} wins", "#4c78a8"), ("ties", "tie", "#bab0ac"),
                                  ("b_wins", f"{summary['b']} wins", "#f58518"),
                                  ("no_verdict", "no verdict", "#e0e0e0")):
            values = [summary["by_category"][c][key] for c in categories]
            ax.barh(categories, values, left=left, label=label, color=color)
            left = [x + v for x, v in zip(left, values)]
        ax.set_xlabel("judged turns")
    else:
        several = summary["mode"] == "pairwise"
        models = list(summary["by_model"] if several else summary["models"])
        height = 0.8 / max(1, len(models))
        for i, model in enumerate(models):
            values = [summary["by_category"][c].get(model) or 0 for c in categories]
            ax.barh([k + i * height for k in range(len(categories))], values, height=height, label=model)
        ax.set_yticks([k + height * (len(models) - 1) / 2 for k in range(len(categories))], categories)
        ax.set_xlim(0, 1 if several else 10)
        ax.set_xlabel("win rate over its pairs (ties as half)" if several else "mean grade (1-10)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize="small")
    return figure
