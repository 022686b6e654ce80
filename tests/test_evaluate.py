"""Question-set evaluation: the embedded SmolLM2 and a scripted endpoint answer, a local judge server
whose verdicts each test chooses judges them, through the runner and through
``python -m vicuna_demo.evaluate``.

Covered: a judge that always says [[A]] gives only ties once both orders are asked; a judge that
recognises one contestant's answer makes it win every game; malformed verdicts count as "no
verdict"; a failing judge leaves the answers and the rest of the run intact and is reported;
two-turn questions carry the first answer into the second turn; single-answer grading with its
mean and interval; FastChat's output shapes (read back as FastChat's show_result does); the
built-in set and bad question files.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

from tests.judge_server import JudgeServer, judged_answers
from vicuna_demo.config import EndpointSpec
from vicuna_demo.engines.protocol import SamplingParams
from vicuna_demo.engines.remote import RemoteEngine
from vicuna_demo.evaluation.outputs import summarize, write_outputs
from vicuna_demo.evaluation.verdicts import parse_pair
from vicuna_demo.evaluation.questions import (QuestionFileError, builtin_questions, load_questions,
                                              parse_questions)
from vicuna_demo.evaluation.runner import EvaluationRunner

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT_ANSWER = "The endpoint's considered answer: 42."
SHORT = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12)
QUESTIONS = """\
{"question_id": 1, "category": "writing", "turns": ["Write one sentence about the sea.", "Now make it rhyme."]}
{"question_id": 2, "category": "math", "turns": ["What is 6 times 7?"], "reference": ["42"]}
{"question_id": 3, "category": "stem", "turns": ["Why is the sky blue?"]}
"""


@pytest.fixture
def questions():
    return parse_questions(QUESTIONS)


@pytest.fixture
def contestant_server():
    """Contestant B: an endpoint that always gives the same answer."""
    with JudgeServer(lambda messages: ENDPOINT_ANSWER) as server:
        yield server


def remote(server: JudgeServer, name: str) -> RemoteEngine:
    return RemoteEngine(EndpointSpec.parse(server.endpoint(name)))


def run(embedded_engine, contestant_server, decide, questions, mode="pairwise", **kwargs):
    with JudgeServer(decide) as judge_server:
        engines = {"Small": embedded_engine, "Endpoint": remote(contestant_server, "Endpoint"),
                   "Judge": remote(judge_server, "Judge")}
        try:
            runner = EvaluationRunner(engines, judge="Judge", answer_params=SHORT, **kwargs)
            result = runner.run(questions, "Small", "Endpoint" if mode == "pairwise" else "Endpoint", mode=mode)
        finally:
            for name in ("Endpoint", "Judge"):
                engines[name].close()
        return result, judge_server.requests


def test_a_judge_that_always_says_A_gives_only_ties_after_order_swapping(embedded_engine, contestant_server,
                                                                        questions):
    result, requests = run(embedded_engine, contestant_server, lambda m: "Assistant A is clearly better. [[A]]",
                           questions)
    summary = summarize(result)
    assert (summary["a_wins"], summary["b_wins"], summary["no_verdict"]) == (0, 0, 0)
    assert summary["ties"] == summary["games"] == 4 == summary["orders_disagree"]   # 3 questions, one of 2 turns
    assert len(requests) == 8                                                        # both orders of every game
    counts = ("a_wins", "b_wins", "ties", "no_verdict")
    assert {c: {k: row[k] for k in counts} for c, row in summary["by_category"].items()} == \
        {"math": {"a_wins": 0, "b_wins": 0, "ties": 1, "no_verdict": 0},
         "stem": {"a_wins": 0, "b_wins": 0, "ties": 1, "no_verdict": 0},
         "writing": {"a_wins": 0, "b_wins": 0, "ties": 2, "no_verdict": 0}}
    assert summary["by_category"]["writing"]["win_rates"]["win_rate_adjusted"] == 0.5   # the new key beside them


def test_a_judge_that_recognises_one_contestant_makes_it_win_every_game(embedded_engine, contestant_server,
                                                                       questions):
    def prefers_the_endpoint(messages):
        first, second = judged_answers(messages)
        assert "42" in first + second or "assistant" in first + second.lower()
        return "Reasoning... [[A]]" if ENDPOINT_ANSWER in first.splitlines()[-1] else "Reasoning... [[B]]"

    result, _ = run(embedded_engine, contestant_server, prefers_the_endpoint, questions)
    summary = summarize(result)
    assert summary["b_wins"] == summary["games"] == 4
    assert summary["a_wins"] == summary["ties"] == summary["no_verdict"] == 0
    assert summary["problems"] == []


def test_malformed_verdicts_count_as_no_verdict_and_are_reported(embedded_engine, contestant_server, questions):
    verdicts = iter(["[[A]]", "[[ B ]]", "I cannot decide.", "[[D]]", "[A]", "**[[c]]**", "[[B]]", "[[B]]"])
    result, _ = run(embedded_engine, contestant_server, lambda m: next(verdicts), questions, max_in_flight=1)
    summary = summarize(result)
    # games in order: (A,B) -> q1t1 and t2 are asked concurrently, so only the totals are fixed
    assert summary["games"] == 4
    assert summary["no_verdict"] == 2 and summary["a_wins"] + summary["b_wins"] + summary["ties"] == 2
    assert any("no well-formed verdict" in p for p in summary["problems"])


def test_a_failing_judge_keeps_the_answers_and_reports_the_failure(embedded_engine, contestant_server, questions,
                                                                  tmp_path):
    with JudgeServer(lambda m: "[[A]]", status=503) as judge_server:
        engines = {"Small": embedded_engine, "Endpoint": remote(contestant_server, "Endpoint"),
                   "Judge": remote(judge_server, "Judge")}
        result = EvaluationRunner(engines, judge="Judge", answer_params=SHORT).run(questions, "Small", "Endpoint")
    summary = summarize(result)
    assert summary["no_verdict"] == summary["games"] == 4
    assert all(a.complete for answers in result.answers.values() for a in answers.values())
    for answer in (a for answers in result.answers.values() for a in answers.values()):   # what each turn took
        assert len(answer.finish_reasons) == len(answer.turns) and set(answer.finish_reasons) <= {"stop", "length"}
        assert answer.n_tokens >= len(answer.turns) and answer.n_tokens <= SHORT.max_new_tokens * len(answer.turns)
    assert any("The judge Judge failed on 4 of 4" in p and "503" in p for p in summary["problems"])
    write_outputs(result, tmp_path, summary)
    rows = [json.loads(line) for line in (tmp_path / "model_judgment" / "Judge_pair.jsonl").open()]
    assert {(r["g1_winner"], r["g2_winner"]) for r in rows} == {("error", "error")}
    assert all("503" in r["error"] for r in rows)


def test_two_turn_questions_carry_the_first_answer_into_the_second_turn(contestant_server, questions):
    with JudgeServer(lambda m: "[[C]]") as judge_server:
        engines = {"Endpoint": remote(contestant_server, "Endpoint"), "Other": remote(contestant_server, "Other"),
                   "Judge": remote(judge_server, "Judge")}
        result = EvaluationRunner(engines, judge="Judge", answer_params=SHORT).run(questions[:1], "Endpoint", "Other")
    second_turns = [m for m in contestant_server.requests if m[-1]["content"] == "Now make it rhyme."]
    assert len(second_turns) == 2
    for messages in second_turns:
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[1]["content"] == ENDPOINT_ANSWER
    turn2 = [j for j in result.judgments if j.turn == 2][0]
    assert "The conversation has 2 user turns" in turn2.g1_prompt and "Now make it rhyme." in turn2.g1_prompt


def test_the_reference_answer_reaches_the_judge_for_math(embedded_engine, contestant_server, questions):
    result, requests = run(embedded_engine, contestant_server, lambda m: "[[C]]", questions)
    math_prompts = [m for m in requests if "What is 6 times 7?" in m[-1]["content"]]
    assert len(math_prompts) == 2
    assert all("<<<reference answer>>>\n42\n" in m[-1]["content"] for m in math_prompts)
    assert all("reference answer" in m[0]["content"] for m in math_prompts)
    others = [m for m in requests if "Why is the sky blue?" in m[-1]["content"]]
    assert others and all("reference" not in m[-1]["content"] for m in others)


def test_single_grading_gives_means_with_intervals_and_fastchat_scores(embedded_engine, contestant_server,
                                                                       questions, tmp_path):
    def grade(messages):
        answer = messages[-1]["content"]
        return "Good. [[9]]" if ENDPOINT_ANSWER in answer else "Weak. Rating: [[3]]"

    result, _ = run(embedded_engine, contestant_server, grade, questions, mode="single")
    summary = summarize(result)
    assert summary["models"]["Endpoint"] == {"mean": 9.0, "ci95": [9.0, 9.0], "n": 4, "no_verdict": 0}
    assert summary["models"]["Small"]["mean"] == 3.0 and summary["models"]["Small"]["n"] == 4
    write_outputs(result, tmp_path, summary)
    rows = [json.loads(line) for line in (tmp_path / "model_judgment" / "Judge_single.jsonl").open()]
    assert sorted({(r["model"], r["score"]) for r in rows}) == [("Endpoint", 9.0), ("Small", 3.0)]
    assert {tuple(r["judge"]) for r in rows} >= {("Judge", "vd-single-v1"), ("Judge", "vd-single-ref-v1")}


def test_outputs_have_fastchat_shapes_that_its_show_result_logic_reads(embedded_engine, contestant_server,
                                                                      questions, tmp_path):
    result, _ = run(embedded_engine, contestant_server, lambda m: "[[C]]", questions)
    write_outputs(result, tmp_path)
    answers = [json.loads(line) for line in (tmp_path / "model_answer" / "Small.jsonl").open()]
    assert [a["question_id"] for a in answers] == [1, 2, 3]
    assert set(answers[0]) >= {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert answers[0]["model_id"] == "Small" and len(answers[0]["choices"][0]["turns"]) == 2
    judgments = [json.loads(line) for line in (tmp_path / "model_judgment" / "Judge_pair.jsonl").open()]
    expected = {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt",
                "g1_judgment", "g2_user_prompt", "g2_judgment", "turn", "tstamp"}
    assert all(expected <= set(j) for j in judgments)
    # FastChat's pairwise tally: a game is a tie when g1 says tie or the games differ
    ties = sum(1 for j in judgments if j["g1_winner"] == "tie" or j["g1_winner"] != j["g2_winner"])
    assert ties == len(judgments) == 4
    assert [json.loads(line)["question_id"] for line in (tmp_path / "question.jsonl").open()] == [1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["ties"] == 4


def test_the_builtin_set_covers_every_category_with_references_for_math_and_reasoning():
    questions = builtin_questions()
    assert 28 <= len(questions) <= 40
    categories = {q.category for q in questions}
    assert categories == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    assert any(len(q.turns) == 2 for q in questions)
    for q in questions:
        if q.category in ("math", "reasoning"):
            assert len(q.reference) == len(q.turns), q.question_id


@pytest.mark.parametrize("text, message", [
    ("", "no questions"),
    ("not json\n", "line 1: not valid JSON"),
    ('{"question_id": 1, "turns": []}\n', "has 0 turns"),
    ('{"question_id": 1, "turns": ["a", "b", "c"]}\n', "has 3 turns"),
    ('{"turns": ["a"]}\n', "question_id must be"),
    ('{"question_id": 1, "turns": ["a"]}\n\n{"question_id": 1, "turns": ["b"]}\n', "line 3: question_id 1 is already used on line 1"),
    ('{"question_id": 1, "turns": ["  "]}\n', "empty turn"),
    ('{"question_id": 1, "turns": "a", "reference": [1]}\n', "reference must be a list of strings"),
])
def test_bad_question_files_are_refused_with_the_line_and_the_reason(text, message):
    with pytest.raises(QuestionFileError, match=message.replace("(", r"\(")):
        parse_questions(text)


def test_vicuna_style_text_questions_and_missing_files(tmp_path):
    assert parse_questions('{"question_id": 5, "text": "Hi?", "category": "generic"}')[0].turns == ("Hi?",)
    with pytest.raises(QuestionFileError, match="cannot read it"):
        load_questions(tmp_path / "nope.jsonl")


def _cli(*args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "vicuna_demo.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_missing_flags_and_bad_files_before_loading_anything(tmp_path):
    done = _cli("--a", "x", "--out", str(tmp_path))
    assert done.returncode == 2 and "--judge NAME is required" in done.stderr
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1}\n')
    done = _cli("--endpoint", "name=J,base_url=http://127.0.0.1:9/v1,model=m", "--judge", "J", "--a", "J",
                "--b", "K", "--out", str(tmp_path))
    assert done.returncode == 2 and "--b 'K': no --model or --endpoint has that name" in done.stderr
    done = _cli("--endpoint", "name=J,base_url=http://127.0.0.1:9/v1,model=m", "--judge", "J", "--a", "J",
                "--mode", "single", "--questions", str(bad), "--out", str(tmp_path))
    assert done.returncode == 2 and "line 1: question 1 has no turns" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--models", "J,K", "--a", "J"], "either --a/--b or --models"),
    (["--models", "J,J"], "--models names J more than once"),
    (["--models", "J"], "pairwise mode compares two or more models"),
    (["--models", "J,K", "--pairs", "baseline"], "--pairs baseline needs --baseline NAME"),
    (["--models", "J,K", "--pairs", "all", "--baseline", "J"], "cannot go with --pairs all"),
    (["--models", "J,K"], "--models 'K': no --model or --endpoint has that name"),
    (["--a", "J", "--b", "J"], "compare two different models"),
    (["--models", "J", "--baseline", "J", "--mode", "single"], "--pairs and --baseline choose what pairwise"),
])
def test_cli_refuses_inconsistent_model_flags(flags, message):
    from vicuna_demo.evaluate import parse_args
    from vicuna_demo.specs import ConfigError
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        parse_args(["--endpoint", "name=J,base_url=http://127.0.0.1:9/v1,model=m", "--judge", "J", *flags,
                    "--out", "x"])


def test_cli_three_endpoints_each_against_a_baseline(tmp_path):
    """--models with --baseline on the command line: answers once per model, one judgment file with both
    pairs, a summary with a row per pair and per model, FastChat's names for the files."""
    qfile = _questions_file(tmp_path / "q.jsonl", 3)

    def prefers_alpha(messages):
        first, second = judged_answers(messages)
        return "[[A]]" if "alpha" in first else "[[B]]" if "alpha" in second else "[[C]]"

    with JudgeServer(lambda m: "alpha answers well") as alpha, JudgeServer(lambda m: "beta answers") as beta, \
            JudgeServer(lambda m: "gamma answers") as gamma, JudgeServer(prefers_alpha) as judge:
        done = _cli("--endpoint", alpha.endpoint("alpha"), "--endpoint", beta.endpoint("beta"),
                    "--endpoint", gamma.endpoint("gamma"), "--endpoint", judge.endpoint("Judge"), "--judge", "Judge",
                    "--models", "alpha,beta", "--baseline", "gamma", "--questions", str(qfile),
                    "--out", str(tmp_path / "out"), "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        assert [len(s.requests) for s in (alpha, beta, gamma)] == [3, 3, 3]
    summary = json.loads(done.stdout)
    assert summary["baseline"] == "gamma" and summary["models_compared"] == ["alpha", "beta", "gamma"]
    assert [(p["a"], p["b"], p["a_wins"], p["ties"]) for p in summary["pairs"]] == \
        [("alpha", "gamma", 3, 0), ("beta", "gamma", 0, 3)]
    assert {m: row["win_rate_adjusted"] for m, row in summary["by_model"].items()} == {"alpha": 1.0, "beta": 0.5}
    rows = [json.loads(line) for line in (tmp_path / "out" / "model_judgment" / "Judge_pair.jsonl").open()]
    assert sorted({(r["model_1"], r["model_2"]) for r in rows}) == [("alpha", "gamma"), ("beta", "gamma")]


@pytest.mark.slow
def test_cli_evaluates_the_embedded_model_against_an_endpoint_and_prints_json(contestant_server, tmp_path):
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text(QUESTIONS)

    def prefers_the_endpoint(messages):
        first, _ = judged_answers(messages)
        return "[[A]]" if ENDPOINT_ANSWER in first else "[[B]]"

    with JudgeServer(prefers_the_endpoint) as judge:
        done = _cli("--model", "embedded,name=Small", "--endpoint", contestant_server.endpoint("Endpoint"),
                    "--endpoint", judge.endpoint("Judge"), "--judge", "Judge", "--a", "Small", "--b", "Endpoint",
                    "--questions", str(qfile), "--out", str(tmp_path / "out"), "--max-new-tokens", "16",
                    "--no-warmup", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert {k: summary[k] for k in ("a", "b", "judge", "questions", "a_wins", "b_wins", "ties")} == \
        {"a": "Small", "b": "Endpoint", "judge": "Judge", "questions": 3, "a_wins": 0, "b_wins": 4, "ties": 0}
    writing = summary["by_category"]["writing"]
    assert {k: writing[k] for k in ("a_wins", "b_wins", "ties", "no_verdict")} == \
        {"a_wins": 0, "b_wins": 2, "ties": 0, "no_verdict": 0}
    assert (tmp_path / "out" / "model_answer" / "Small.jsonl").is_file()
    assert (tmp_path / "out" / "model_judgment" / "Judge_pair.jsonl").is_file()
    assert not (ROOT / "logs" / "evaluation").exists()


def test_a_flagged_reference_answer_keeps_its_question_from_every_model_and_the_judge():
    """The reference reaches the judge, so it is moderated with the turns (a visitor's upload)."""
    from types import SimpleNamespace

    from tests.engines import RecordingEngine
    engines = {name: RecordingEngine(name, f"{name} answers. [[A]]", delay_s=0.0) for name in ("A", "B", "Judge")}
    questions = parse_questions('{"question_id": 1, "category": "math", "turns": ["What is 2+2?"], '
                                '"reference": ["4, and FORBIDDEN words"]}\n'
                                '{"question_id": 2, "category": "math", "turns": ["What is 3+3?"], '
                                '"reference": ["6"]}\n')
    checked = []

    def moderate(text):
        checked.append(text)
        return SimpleNamespace(allowed="FORBIDDEN" not in text, status="flagged")

    result = EvaluationRunner(engines, judge="Judge", answer_params=SHORT, moderate=moderate).run(questions, "A", "B")
    assert any("FORBIDDEN" in text for text in checked)
    assert all("FORBIDDEN" not in text for engine in engines.values() for text in engine.texts())
    assert result.answers["A"][1].error.startswith("stopped by content moderation")
    assert [j.question.question_id for j in result.judgments] == [2]


def _questions_file(path: Path, n: int) -> Path:
    lines = [json.dumps({"question_id": i, "category": ("math", "writing", "stem")[i % 3],
                         "turns": [f"Question {i}?"] + ([f"And a follow-up to {i}?"] if i % 4 == 0 else [])})
             for i in range(1, n + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_against_throttling_servers_gets_every_verdict(tmp_path):
    """Servers that answer 429 (Retry-After) above 8 requests in flight, 500 to every 7th request and
    answer slowly: with retries and the per-endpoint limit, every answer and every verdict arrives."""
    def prefers_alpha(messages):
        first, _ = judged_answers(messages)
        return "Thinking it over. [[A]]" if "alpha" in first else "Thinking it over. [[B]]"

    rude = dict(max_concurrent=8, retry_after=0.2, fail_every=7, delay_s=0.05)
    with JudgeServer(lambda m: "alpha answers well", **rude) as alpha, \
            JudgeServer(lambda m: "beta answers too", **rude) as beta, JudgeServer(prefers_alpha, **rude) as judge:
        done = _cli("--endpoint", alpha.endpoint("alpha"), "--endpoint", beta.endpoint("beta"),
                    "--endpoint", judge.endpoint("Judge"), "--judge", "Judge", "--a", "alpha", "--b", "beta",
                    "--endpoint-concurrency", "12", "--questions", str(_questions_file(tmp_path / "q.jsonl", 24)),
                    "--out", str(tmp_path / "out"), "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["games"], summary["a_wins"], summary["no_verdict"], summary["problems"]) == (30, 30, 0, [])
    refused = [server.refused for server in (alpha, beta, judge)]
    assert all(r[500] for r in refused) and sum(r[429] for r in refused), refused   # the servers did misbehave
    assert max(alpha.peak, beta.peak, judge.peak) <= 8


def test_cli_with_a_failing_judge_keeps_what_succeeded_says_how_many_failed_and_exits_1(tmp_path):
    def prefers_alpha(messages):
        first, _ = judged_answers(messages)
        return "[[A]]" if "alpha" in first else "[[B]]"

    with JudgeServer(lambda m: "alpha answers well") as alpha, JudgeServer(lambda m: "beta answers") as beta, \
            JudgeServer(prefers_alpha, fail_when=lambda m: "Question 2?" in m[-1]["content"]) as judge:
        done = _cli("--endpoint", alpha.endpoint("alpha"), "--endpoint", beta.endpoint("beta"),
                    "--endpoint", judge.endpoint("Judge", retries=1), "--judge", "Judge", "--a", "alpha",
                    "--b", "beta", "--questions", str(_questions_file(tmp_path / "q.jsonl", 3)),
                    "--out", str(tmp_path / "out"), "--json")
    assert done.returncode == 1
    assert "the evaluation is incomplete: 1 of 3 judgments failed" in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["a_wins"], summary["no_verdict"]) == (2, 1)
    rows = [json.loads(line) for line in (tmp_path / "out" / "model_judgment" / "Judge_pair.jsonl").open()]
    assert [r["g1_winner"] for r in rows] == ["model_1", "error", "model_1"] and "500" in rows[1]["error"]


def _prefers_alpha(messages):
    first, _ = judged_answers(messages)
    return "[[A]]" if "alpha" in first else "[[B]]"


def _endpoints(alpha, beta, judge, **judge_extra):
    return ["--endpoint", alpha.endpoint("alpha"), "--endpoint", beta.endpoint("beta"),
            "--endpoint", judge.endpoint("Judge", **judge_extra), "--judge", "Judge", "--a", "alpha", "--b", "beta"]


def test_a_rerun_into_the_same_out_computes_only_what_is_missing(tmp_path):
    qfile, out = _questions_file(tmp_path / "q.jsonl", 4), str(tmp_path / "out")
    with JudgeServer(lambda m: "alpha answers well") as alpha, JudgeServer(lambda m: "beta answers") as beta:
        with JudgeServer(_prefers_alpha, fail_when=lambda m: "Question 3?" in m[-1]["content"]) as judge:
            first = _cli(*_endpoints(alpha, beta, judge, retries=0), "--questions", str(qfile), "--out", out, "--json")
        assert first.returncode == 1 and "1 of 5 judgments failed" in first.stderr
        asked = len(alpha.requests), len(beta.requests)
        with JudgeServer(_prefers_alpha) as judge:
            second = _cli(*_endpoints(alpha, beta, judge), "--questions", str(qfile), "--out", out, "--json")
        assert second.returncode == 0, second.stderr[-2000:]
        assert (len(alpha.requests), len(beta.requests)) == asked          # no answer asked again
        assert len(judge.requests) == 2                                    # only the failed judgment, both orders
    summary = json.loads(second.stdout)
    assert (summary["a_wins"], summary["games"], summary["no_verdict"]) == (5, 5, 0)
    rows = [json.loads(line) for line in (tmp_path / "out" / "model_judgment" / "Judge_pair.jsonl").open()]
    assert len(rows) == 5 and not any("error" in r for r in rows)


def test_answers_dir_judges_fastchat_answer_files_of_models_not_loaded(tmp_path):
    qfile = _questions_file(tmp_path / "q.jsonl", 3)
    folder = tmp_path / "mt_bench" / "model_answer"
    folder.mkdir(parents=True)
    for model, text in (("alpha", "alpha's saved answer"), ("beta", "beta's saved answer")):
        with open(folder / f"{model}.jsonl", "w") as f:
            for q in parse_questions(qfile.read_text()):      # FastChat's own shape: no generate_params, no error
                f.write(json.dumps({"question_id": q.question_id, "answer_id": "x", "model_id": model,
                                    "choices": [{"index": 0, "turns": [text] * len(q.turns)}], "tstamp": 1.0}) + "\n")
    with JudgeServer(_prefers_alpha) as judge:
        done = _cli("--endpoint", judge.endpoint("Judge"), "--judge", "Judge", "--a", "alpha", "--b", "beta",
                    "--answers", str(tmp_path / "mt_bench"), "--questions", str(qfile), "--out",
                    str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert (summary["a_wins"], summary["games"]) == (3, 3)
    assert all("alpha's saved answer" in m[-1]["content"] for m in judge.requests)


def test_ctrl_c_writes_what_is_done_and_a_rerun_finishes_the_rest(tmp_path):
    import signal
    qfile, out = _questions_file(tmp_path / "q.jsonl", 6), tmp_path / "out"
    hold = {"on": True}

    def slow_on_question_6(messages):
        while hold["on"] and "Question 6?" in messages[-1]["content"]:
            time.sleep(0.05)
        return _prefers_alpha(messages)

    with JudgeServer(lambda m: "alpha answers well") as alpha, JudgeServer(lambda m: "beta answers") as beta, \
            JudgeServer(slow_on_question_6) as judge:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "vicuna_demo.evaluate", *_endpoints(alpha, beta, judge),
                                 "--questions", str(qfile), "--out", str(out), "--json"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:                       # wait until all but question 6 are judged
            if line.startswith("judgments: 12/14"):     # 2 requests (both orders) per judgment
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        hold["on"] = False
        assert proc.returncode == 130, stderr[-2000:]
        assert "Traceback" not in stderr and "Interrupted: what was done is written" in stderr
        answers = [json.loads(line) for line in (out / "model_answer" / "alpha.jsonl").open()]
        assert len(answers) == 6 and not any("error" in a for a in answers)
        assert json.loads(stdout)["a_wins"] == 6
        asked = len(judge.requests)
        done = _cli(*_endpoints(alpha, beta, judge), "--questions", str(qfile), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["a_wins"] == 7
    assert len(judge.requests) - asked == 2                           # question 6 only, in both orders


def test_reference_file_is_used_for_math_reasoning_coding_only_with_both_turns_on_turn_2(tmp_path):
    """FastChat's rule: a reference answer file (reference_answer/gpt-4.jsonl) for the categories that need
    one; the question file's own short hints are not used then; turn 2 shows both turns' references."""
    from tests.engines import RecordingEngine
    questions = parse_questions(
        '{"question_id": 1, "category": "math", "turns": ["2+2?", "Times 3?"], "reference": ["hint only"]}\n'
        '{"question_id": 2, "category": "writing", "turns": ["A poem."], "reference": ["a writing hint"]}\n'
        '{"question_id": 3, "category": "coding", "turns": ["Sort a list."]}\n')
    ref = tmp_path / "gpt-4.jsonl"
    ref.write_text("".join(json.dumps({"question_id": qid, "model_id": "gpt-4", "choices": [{"index": 0, "turns": t}]})
                           + "\n" for qid, t in ((1, ["REF-ONE: 4", "REF-TWO: 12"]), (2, ["REF-POEM"]),
                                                 (3, ["REF-SORT: sorted(x)"]))))
    from vicuna_demo.evaluation.outputs import read_references
    engines = {name: RecordingEngine(name, f"{name} says [[A]]", delay_s=0.0) for name in ("A", "B", "Judge")}
    result = EvaluationRunner(engines, judge="Judge", answer_params=SHORT,
                              references=read_references(ref)).run(questions, "A", "B")
    prompts = {(j.question.question_id, j.turn): (j.prompt_name, j.g1_prompt) for j in result.judgments}
    turn1 = prompts[1, 1][1]
    assert "REF-ONE: 4" in turn1 and "REF-TWO" not in turn1 and "hint only" not in turn1
    assert "<<<reference answer to turn 1>>>\nREF-ONE: 4" in prompts[1, 2][1]
    assert "<<<reference answer to turn 2>>>\nREF-TWO: 12" in prompts[1, 2][1]
    assert prompts[1, 2][0] == "vd-pair-ref-multi-v1"
    assert "REF-POEM" not in prompts[2, 1][1] and "hint" not in prompts[2, 1][1] and prompts[2, 1][0] == "vd-pair-v1"
    assert "REF-SORT" in prompts[3, 1][1]


def test_answers_only_mode_needs_no_judge_and_reports_answer_lengths(tmp_path):
    qfile, out = _questions_file(tmp_path / "q.jsonl", 4), tmp_path / "out"
    with JudgeServer(lambda m: "alpha answers well") as alpha, JudgeServer(lambda m: "beta says more than alpha") as beta:
        done = _cli("--endpoint", alpha.endpoint("alpha"), "--endpoint", beta.endpoint("beta"), "--mode", "answers",
                    "--a", "alpha", "--b", "beta", "--questions", str(qfile), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["mode"] == "answers" and summary["judge"] is None
    assert summary["models"]["alpha"]["answers"] == 4 and summary["models"]["alpha"]["chars_median"] == 18
    assert summary["models"]["beta"]["chars_mean"] > summary["models"]["alpha"]["chars_mean"]
    assert sorted(p.name for p in (out / "model_answer").iterdir()) == ["alpha.jsonl", "beta.jsonl"]
    assert not (out / "model_judgment").exists()
    first = json.loads((out / "model_answer" / "alpha.jsonl").open().readline())
    assert first["finish_reasons"] == ["stop"] and first["n_tokens"] > 0


def test_win_rates_follow_fastchat_counting_with_a_bootstrap_interval():
    from vicuna_demo.evaluation.statistics import win_rates
    from vicuna_demo.evaluation.runner import Judgment
    from vicuna_demo.evaluation.verdicts import combine
    q = parse_questions('{"question_id": 1, "turns": ["q"]}')[0]

    def judged(g1, g2):
        return Judgment(question=q, turn=1, judge="J", prompt_name="p", model_a="A", model_b="B",
                        verdict=combine(g1, g2))
    # 6 wins (both orders agree), 2 losses, 2 ties because the orders disagree, 1 with no verdict
    judgments = [judged("A", "B")] * 6 + [judged("B", "A")] * 2 + [judged("A", "A")] * 2 + [judged(None, "A")]
    rates = win_rates(judgments)
    assert (rates["n"], rates["win_rate"], rates["loss_rate"], rates["win_rate_adjusted"]) == (10, 0.6, 0.2, 0.7)
    low, high = rates["ci95"]
    assert 0.35 < low < 0.7 < high <= 1.0
    assert win_rates([]) == {"n": 0, "win_rate": None, "loss_rate": None, "win_rate_adjusted": None, "ci95": None}


def _judge_prompts_file(path: Path) -> Path:
    """A file in FastChat's judge_prompts.jsonl format, with test text of our own under FastChat's names."""
    lines = []
    for (kind, ref, multi), name in __import__("vicuna_demo.evaluation.prompts", fromlist=["x"]).FASTCHAT_NAMES.items():
        if kind == "pair":
            body = ("Q1={question_1} A1={answer_a_1} B1={answer_b_1} Q2={question_2} A2={answer_a_2} B2={answer_b_2}"
                    if multi else "Q={question} A={answer_a} B={answer_b}")
        else:
            body = "Q1={question_1} X1={answer_1} Q2={question_2} X2={answer_2}" if multi else "Q={question} X={answer}"
        if ref:
            body += " R1={ref_answer_1}" + (" R2={ref_answer_2}" if multi else "")
        lines.append(json.dumps({"name": name, "type": kind, "system_prompt": f"SYSTEM {name}",
                                 "prompt_template": f"[{name}] {body}", "output_format": "[[A]]"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fastchat_judge_prompts_are_used_by_name_and_parsed_by_fastchats_rules(tmp_path):
    from tests.engines import RecordingEngine
    from vicuna_demo.evaluation.prompts import load_judge_prompts
    questions = parse_questions('{"question_id": 1, "category": "math", "turns": ["2+2?", "Times 3?"], '
                                '"reference": ["4", "12"]}\n{"question_id": 2, "category": "writing", '
                                '"turns": ["A poem."]}\n')
    engines = {"A": RecordingEngine("A", "alpha", delay_s=0.0), "B": RecordingEngine("B", "beta", delay_s=0.0),
               # FastChat takes the first of [[A]], [[B]], [[C]] in that order; our own rule would take the last
               "Judge": RecordingEngine("Judge", "[[A]] looked right at first, but [[B]]", delay_s=0.0)}
    prompts = load_judge_prompts(_judge_prompts_file(tmp_path / "judge_prompts.jsonl"))
    result = EvaluationRunner(engines, judge="Judge", answer_params=SHORT, judge_prompts=prompts).run(
        questions, "A", "B")
    by_turn = {(j.question.question_id, j.turn): j for j in result.judgments}
    assert by_turn[1, 1].prompt_name == "pair-math-v1" and by_turn[1, 1].g1_prompt == \
        "[pair-math-v1] Q=2+2? A=alpha B=beta R1=4"
    assert by_turn[1, 2].prompt_name == "pair-math-v1-multi-turn"
    assert by_turn[1, 2].g2_prompt.endswith("A2=beta B2=alpha R1=4 R2=12")
    assert by_turn[2, 1].prompt_name == "pair-v2" and by_turn[2, 1].g1_prompt == "[pair-v2] Q=A poem. A=alpha B=beta"
    assert engines["Judge"].received[0][0] == {"role": "system", "content": "SYSTEM pair-math-v1"}
    assert all(j.verdict.g1 == "model_a" and j.verdict.g2 == "model_b" for j in result.judgments)  # [[A]] wins
    assert parse_pair("[[A]] looked right at first, but [[B]]") == "B"                             # ours: the last


def test_fastchats_show_result_reads_our_outputs_and_gets_our_numbers(tmp_path, capsys):
    """FastChat's own show_result.py (fschat, a test dependency) on the files we write, pairwise and single."""
    import argparse

    show_result = pytest.importorskip("fastchat.llm_judge.show_result")
    from tests.engines import RecordingEngine
    questions = parse_questions(QUESTIONS)

    def engines(verdict):
        return {"A": RecordingEngine("A", "alpha", delay_s=0.0), "B": RecordingEngine("B", "beta", delay_s=0.0),
                "Judge": RecordingEngine("Judge", verdict, delay_s=0.0)}

    pair = EvaluationRunner(engines("It is [[A]]"), judge="Judge", answer_params=SHORT).run(questions, "A", "B")
    single = EvaluationRunner(engines("Fine. [[7]]"), judge="Judge", answer_params=SHORT).run(
        questions, "A", "B", mode="single")
    write_outputs(pair, tmp_path / "pair")
    write_outputs(single, tmp_path / "single")
    ours = summarize(pair)
    args = argparse.Namespace(bench_name="mt_bench", judge_model="Judge", baseline_model=None, model_list=None,
                              input_file=str(tmp_path / "pair" / "model_judgment" / "Judge_pair.jsonl"))
    show_result.display_result_pairwise(args)
    printed = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in printed if line.startswith("A "))    # model win loss tie rates...
    assert [int(x) for x in row[1:4]] == [ours["a_wins"], ours["b_wins"], ours["ties"]]
    assert float(row[-1]) == pytest.approx(ours["a_win_rates"]["win_rate_adjusted"], abs=1e-3)
    args.input_file = str(tmp_path / "single" / "model_judgment" / "Judge_single.jsonl")
    show_result.display_result_single(args)
    printed = capsys.readouterr().out
    assert "7.0" in printed and summarize(single)["models"]["A"]["mean"] == 7.0


class _LengthJudge:
    """A judge engine that prefers the longer of the two answers it is shown (both orders agree)."""

    def __new__(cls):
        from tests.engines import RecordingEngine, ScriptedReply

        class Judge(RecordingEngine):
            def stream(self, prompt, params):
                super().stream(prompt, params)
                first, second = judged_answers(list(prompt.payload))
                return ScriptedReply(["[[A]]" if len(first) > len(second) else "[[B]]"], 0.0)
        return Judge("Judge", delay_s=0.0)


def test_three_models_all_pairs_and_baseline_fastchat_show_result_agrees(tmp_path, capsys):
    """--models A,B,C: each model answers once; every pair (or each against the baseline) is judged in both
    orders; FastChat's show_result.py (pairwise-all and pairwise-baseline) reads the one judgment file and
    counts what our summary's by_model counts."""
    import argparse

    import pandas as pd
    show_result = pytest.importorskip("fastchat.llm_judge.show_result")
    from tests.engines import RecordingEngine
    from vicuna_demo.evaluation.runner import model_pairs
    questions = parse_questions(QUESTIONS)            # 3 questions, 4 turns
    models = ["long", "short", "medium"]
    replies = {"long": "a long and detailed answer with many words", "short": "short",
               "medium": "a medium answer"}

    def run_pairs(how, baseline=None):
        engines = {m: RecordingEngine(m, replies[m], delay_s=0.0) for m in models} | {"Judge": _LengthJudge()}
        result = EvaluationRunner(engines, judge="Judge", answer_params=SHORT).run(
            questions, *models, pairs=model_pairs(models, how, baseline))
        assert all(len(engines[m].received) == 4 for m in models)         # each model answered each turn once
        return result, engines["Judge"]

    result, judge = run_pairs("all")
    assert result.pairs == (("long", "short"), ("long", "medium"), ("short", "medium"))
    assert len(result.judgments) == 12 and len(judge.received) == 24     # 3 pairs x 4 turns, both orders
    write_outputs(result, tmp_path / "all")
    summary = summarize(result)
    assert [(p["a"], p["b"], p["a_wins"], p["b_wins"]) for p in summary["pairs"]] == \
        [("long", "short", 4, 0), ("long", "medium", 4, 0), ("short", "medium", 0, 4)]
    assert "a" not in summary and summary["by_model"]["long"]["win_rate_adjusted"] == 1.0
    assert summary["by_category"]["math"] == {"long": 1.0, "medium": 0.5, "short": 0.0}
    assert summary["pairs"][0]["length_controlled"]["win_rate"] is None   # always longer: no way to tell apart
    files = sorted(p.name for p in (tmp_path / "all" / "model_answer").iterdir())
    assert files == ["long.jsonl", "medium.jsonl", "short.jsonl"]

    def shown(path, baseline=None):
        args = argparse.Namespace(bench_name="mt_bench", judge_model="Judge", baseline_model=baseline,
                                  model_list=None, input_file=str(path / "model_judgment" / "Judge_pair.jsonl"))
        with pd.option_context("display.width", 200):
            show_result.display_result_pairwise(args)
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        return {r[0]: [int(x) for x in r[1:4]] for r in rows if r and r[0] in models}

    ours = {m: [row["wins"], row["losses"], row["ties"]] for m, row in summary["by_model"].items()}
    assert shown(tmp_path / "all") == ours == {"long": [8, 0, 0], "medium": [4, 4, 0], "short": [0, 8, 0]}

    from vicuna_demo.evaluation.outputs import read_answers, read_judgments
    engines = {m: RecordingEngine(m, replies[m], delay_s=0.0) for m in models} | {"Judge": _LengthJudge()}
    again = EvaluationRunner(engines, judge="Judge", answer_params=SHORT).run(
        questions, *models, reuse_answers={m: read_answers(tmp_path / "all", m, questions) for m in models},
        reuse_judgments=read_judgments(tmp_path / "all", "Judge", "pairwise", questions))
    assert not any(e.received for e in engines.values())              # a rerun of all pairs computes nothing
    assert summarize(again)["by_model"] == summary["by_model"]

    result, judge = run_pairs("baseline", "medium")
    assert result.pairs == (("long", "medium"), ("short", "medium")) and result.baseline == "medium"
    assert len(judge.received) == 16
    write_outputs(result, tmp_path / "baseline")
    summary = summarize(result)
    assert summary["baseline"] == "medium" and list(summary["by_model"]) == ["long", "short"]
    ours = {m: [row["wins"], row["losses"], row["ties"]] for m, row in summary["by_model"].items()}
    assert shown(tmp_path / "baseline", "medium") == ours == {"long": [4, 0, 0], "short": [0, 4, 0]}
    text = __import__("vicuna_demo.evaluation.outputs", fromlist=["x"]).format_summary(summary)
    assert "each against medium" in text and "long vs medium:" in text


def test_single_mode_with_one_model_asks_only_that_model():
    """The page's call for one graded model: run(questions, a, None, mode="single")."""
    from tests.engines import RecordingEngine
    engines = {"A": RecordingEngine("A", "alpha", delay_s=0.0), "Judge": RecordingEngine("Judge", "[[6]]", delay_s=0.0)}
    result = EvaluationRunner(engines, judge="Judge", answer_params=SHORT).run(
        parse_questions(QUESTIONS), "A", None, mode="single")
    assert result.models == ("A",) and list(result.answers) == ["A"] and result.pairs == ()
    assert summarize(result)["models"]["A"]["mean"] == 6.0 and not summarize(result)["problems"]
