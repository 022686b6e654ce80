"""Behaviour tests for the export and leaderboard command lines, run as real subprocesses.

Run: .venv-test/bin/python -m pytest tests/test_export_leaderboard_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vicuna_demo.data.ratings import compute_leaderboard
from vicuna_demo.data.storage import JudgeVoteRecord, Store, TurnRecord, VoteRecord

REPO = Path(__file__).resolve().parents[1]
WINNERS = {"model_a", "model_b", "tie", "tie (bothbad)"}


def run_module(module: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def turn(conversation_id: str, index: int, user: str, reply: str, *, system: str | None = "Be helpful.",
         **overrides) -> TurnRecord:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    fields = dict(conversation_id=conversation_id, turn_index=index, tstamp=1000.0 + index, client_hash="h" * 64,
                  model="vicuna-7b", template="vicuna_v1.1", params={"temperature": 0.7}, messages=messages,
                  reply=reply, finish_reason="stop", n_tokens=3, ttft_s=0.1, tok_s=12.0, moderation="passed",
                  moderation_categories=())
    fields.update(overrides)
    return TurnRecord(**fields)


def vote(battle_id: str, model_a: str, model_b: str, winner: str, *, anony: bool = True, counted: bool = True,
         reason: str | None = None) -> VoteRecord:
    return VoteRecord(battle_id=battle_id, tstamp=2000.0, client_hash="v" * 64, anony=anony, model_a=model_a,
                      model_b=model_b, winner=winner, counted=counted, not_counted_reason=reason,
                      conversation_a_id=f"{battle_id}-a", conversation_b_id=f"{battle_id}-b")


@pytest.fixture
def log_dir(tmp_path) -> Path:
    logs = tmp_path / "logs"
    with Store(logs) as store:
        store.log_turn(turn("c1", 0, "What is 2+2?", "4."))
        store.log_turn(turn("c1", 1, "And 3+3?", "first try"))
        store.log_turn(turn("c1", 1, "And 3+3?", "6."))  # regenerated: this reply wins
        store.log_turn(turn("c1", 2, "Say something awful", "awful text", finish_reason="moderated",
                            moderation="flagged", moderation_categories=("harassment",)))
        store.log_turn(turn("c2", 0, "Hi", "Hello!", system=None, model="smollm2", battle_id="b1", side="b"))
        store.log_vote(vote("b1", "vicuna-7b", "smollm2", "model_a"))
        store.log_vote(vote("b2", "vicuna-7b", "smollm2", "tie (bothbad)"))
        store.log_vote(vote("b3", "smollm2", "vicuna-7b", "model_b", counted=False, reason="identity_leak"))
        store.log_vote(vote("b4", "vicuna-7b", "smollm2", "model_b", anony=False))
    return logs


def test_export_writes_sharegpt_conversations(log_dir, tmp_path):
    out = tmp_path / "conversations.jsonl"
    result = run_module("vicuna_demo.data.export", "--log-dir", log_dir, "--conversations", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"c1", "c2"}
    for record in records.values():
        assert set(record) == {"id", "model", "conversations"}
        assert all(set(m) == {"from", "value"} and m["from"] in {"system", "human", "gpt"}
                   for m in record["conversations"])
    assert records["c1"]["model"] == "vicuna-7b"
    assert records["c1"]["conversations"] == [
        {"from": "system", "value": "Be helpful."},
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "4."},
        {"from": "human", "value": "And 3+3?"},
        {"from": "gpt", "value": "6."},
        {"from": "human", "value": "Say something awful"},  # moderated: user text kept, reply omitted
    ]
    assert records["c2"]["conversations"] == [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]


def test_export_writes_clean_battles_anonymous_only_by_default(log_dir, tmp_path):
    out = tmp_path / "battles.jsonl"
    result = run_module("vicuna_demo.data.export", "--log-dir", log_dir, "--battles", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == ["b1", "b2", "b3"]
    for row in rows:
        assert {"question_id", "model_a", "model_b", "winner", "anony", "tstamp", "counted"} <= set(row)
        assert row["winner"] in WINNERS and row["anony"] is True and isinstance(row["tstamp"], float)
    assert [r["counted"] for r in rows] == [True, True, False]
    assert rows[2]["not_counted_reason"] == "identity_leak"
    assert "v" * 64 == rows[0]["judge"]
    # style counts in FastChat's conv_metadata shape (counted from the stored replies: none here)
    assert rows[0]["conv_metadata"]["sum_assistant_a_tokens"] == rows[0]["conv_metadata"]["sum_assistant_b_tokens"] == 0
    assert set(rows[0]["conv_metadata"]["header_count_a"]) == {"h1", "h2", "h3", "h4", "h5", "h6"}


def test_export_include_named_adds_named_battles(log_dir, tmp_path):
    out = tmp_path / "battles.jsonl"
    result = run_module("vicuna_demo.data.export", "--log-dir", log_dir, "--battles", out, "--include-named", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [(r["question_id"], r["anony"]) for r in rows] == [("b1", True), ("b2", True), ("b3", True), ("b4", False)]


def judge_vote(battle_id: str, winner: str, conversations: tuple[str, str], *, tstamp: float, g1="model_a",
               g2="model_a", error=None, said="") -> JudgeVoteRecord:
    return JudgeVoteRecord(battle_id=battle_id, tstamp=tstamp, client_hash="j" * 64, judge="GPT-4o",
                           prompt="pair-v1", model_a="vicuna-7b", model_b="smollm2", winner=winner, g1_winner=g1,
                           g2_winner=g2, g1_judgment=f"{battle_id} first order: {said}[[A]]",
                           g2_judgment=f"{battle_id} second order: [[B]]", error=error, n_turns=1,
                           conversation_a_id=conversations[0], conversation_b_id=conversations[1])


def test_export_writes_judge_votes_as_pairwise_judgments_redacted_like_the_conversations(log_dir, tmp_path):
    with Store(log_dir) as store:
        store.log_turn(turn("c5", 0, "Name a colour.", "Blue.", battle_id="b5", side="a"))
        store.log_turn(turn("c6", 0, "Name a colour.", "Red.", model="smollm2", battle_id="b5", side="b"))
        # c1 holds a moderated reply: the judge's text on its battle may quote it
        store.log_judge_vote(judge_vote("b1", "model_b", ("c1", "c2"), tstamp=3000.0, g1="model_b", g2="model_b",
                                        said="A said 'awful text'. "))
        store.log_judge_vote(judge_vote("b1", "model_a", ("c1", "c2"), tstamp=3001.0))   # asked again: this counts
        store.log_judge_vote(judge_vote("b5", "model_a", ("c5", "c6"), tstamp=3002.0))
        store.log_judge_vote(judge_vote("b6", "no_verdict", ("c5", "c6"), tstamp=3003.0, g1=None, g2=None,
                                        error="the judge timed out"))
    out = tmp_path / "judge_votes.jsonl"
    result = run_module("vicuna_demo.data.export", "--log-dir", log_dir, "--judge-votes", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 judge votes" in result.stderr
    rows = read_jsonl(out)
    assert [(r["question_id"], r["winner"], r["counted"]) for r in rows] == [
        ("b1", "model_b", False), ("b1", "model_a", True), ("b5", "model_a", True), ("b6", "no_verdict", False)]
    b5 = rows[2]
    assert b5 == {"question_id": "b5", "model_a": "vicuna-7b", "model_b": "smollm2", "winner": "model_a",
                  "judge": ["GPT-4o", "pair-v1"], "g1_winner": "model_a", "g2_winner": "model_a",
                  "g1_judgment": "b5 first order: [[A]]", "g2_judgment": "b5 second order: [[B]]",
                  "judgment_withheld": None, "error": None, "turn": 1, "tstamp": 3002.0, "client": "j" * 64,
                  "conversation_a_id": "c5", "conversation_b_id": "c6", "counted": True}
    for row in rows[:2]:   # the moderated conversation's battle: verdicts kept, the judge's words left out
        assert row["g1_judgment"] is None and row["g2_judgment"] is None
        assert row["judgment_withheld"] == "moderated" and row["g1_winner"] is not None
    assert "awful" not in out.read_text()
    assert rows[3]["error"] == "the judge timed out" and rows[3]["g1_winner"] is None
    # the judge leaderboard's battles are exactly the counted rows
    with Store(log_dir, read_only=True) as store:
        assert store.judge_battles() == [(r["model_a"], r["model_b"], r["winner"]) for r in rows if r["counted"]]
    # judge votes never enter the human battles export
    battles = tmp_path / "battles.jsonl"
    assert run_module("vicuna_demo.data.export", "--log-dir", log_dir, "--battles", battles, "--include-named",
                      cwd=tmp_path).returncode == 0
    assert "j" * 64 not in battles.read_text()


def test_export_without_a_store_fails_with_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_module("vicuna_demo.data.export", "--log-dir", empty, "--battles", tmp_path / "b.jsonl", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")
    assert "no store" in result.stderr
    assert list(empty.iterdir()) == []  # exporting created nothing
    assert not (tmp_path / "b.jsonl").exists()


def test_export_of_a_broken_store_fails_cleanly(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "vicuna_demo.sqlite3").write_bytes(b"garbage" * 1000)
    result = run_module("vicuna_demo.data.export", "--log-dir", logs, "--battles", tmp_path / "b.jsonl", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error:") and result.stderr.strip().count("\n") == 0


def test_leaderboard_json_matches_compute_leaderboard(tmp_path):
    rng = np.random.default_rng(9)
    true = {"alpha": 1150.0, "beta": 1000.0, "gamma": 850.0}
    names = list(true)
    rows = []
    for i in range(3000):
        a, b = rng.choice(3, size=2, replace=False)
        p = 1 / (1 + 10 ** (-(true[names[a]] - true[names[b]]) / 400))
        winner = "tie" if rng.random() < 0.1 else ("model_a" if rng.random() < p else "model_b")
        rows.append({"question_id": f"q{i}", "model_a": names[a], "model_b": names[b], "winner": winner,
                     "anony": True, "tstamp": float(i)})
    path = tmp_path / "battles.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_module("vicuna_demo.data.leaderboard", path, "--json", "--bootstrap", "50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"min_battles", "models"} and printed["min_battles"] == 20
    expected = compute_leaderboard([(r["model_a"], r["model_b"], r["winner"]) for r in rows],
                                   bootstrap_rounds=50, seed=0)
    assert [m["model"] for m in printed["models"]] == ["alpha", "beta", "gamma"]
    for got, want in zip(printed["models"], expected, strict=True):
        assert {"model", "rating", "ci_lower", "ci_upper", "battles", "rank", "provisional"} == set(got)
        assert got["model"] == want.model and got["battles"] == want.battles and got["rank"] == want.rank
        assert got["provisional"] is False and got["rank"] in (1, 2, 3)
        assert got["rating"] == pytest.approx(want.rating)
        assert got["ci_lower"] == pytest.approx(want.ci_lower)
        assert got["ci_upper"] == pytest.approx(want.ci_upper)


def test_leaderboard_table_is_aligned_and_shows_ci(tmp_path):
    path = tmp_path / "battles.json"  # a JSON array works too
    rows = ([{"model_a": "vicuna-13b", "model_b": "tiny", "winner": "model_a"}] * 30
            + [{"model_a": "tiny", "model_b": "vicuna-13b", "winner": "model_a"}] * 10
            + [{"model_a": "tiny", "model_b": "vicuna-13b", "winner": "tie"}] * 5)
    path.write_text(json.dumps(rows))
    result = run_module("vicuna_demo.data.leaderboard", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "model", "rating", "95%", "CI", "battles"]
    assert len(lines) == 3
    assert lines[1].split()[:2] == ["1", "vicuna-13b"] and lines[2].split()[1] == "tiny"
    assert "+" in lines[1] and "/-" in lines[1]
    assert lines[1].split()[-1] == "45"
    assert len({len(line) for line in lines[1:]}) == 1  # rows share column positions


def test_leaderboard_skips_and_reports_unknown_winners_and_uncounted_rows(tmp_path):
    path = tmp_path / "battles.jsonl"
    rows = [
        {"model_a": "a", "model_b": "b", "winner": "model_a"},
        {"model_a": "a", "model_b": "b", "winner": "model_b"},
        {"model_a": "a", "model_b": "b", "winner": "leftvote"},
        {"model_a": "a", "model_b": "b", "winner": None},
        {"model_a": "a", "model_b": "b", "winner": "tie", "counted": False},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    result = run_module("vicuna_demo.data.leaderboard", path, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 winner not one of" in result.stderr and "1 not counted" in result.stderr
    assert {m["model"]: m["battles"] for m in json.loads(result.stdout)["models"]} == {"a": 2, "b": 2}
    result = run_module("vicuna_demo.data.leaderboard", path, "--json", "--include-uncounted", cwd=tmp_path)
    assert {m["model"]: m["battles"] for m in json.loads(result.stdout)["models"]} == {"a": 3, "b": 3}


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ('{"model_a": "a", "model_b": "b", "winner": "tie"}\n{"model_a": oops}\n', "line 2"),
    ("[1, 2, 3]", "not a JSON object"),
    ('[{"model_a": "a"', "not valid JSON"),
])
def test_leaderboard_rejects_missing_or_malformed_files(tmp_path, content, message):
    path = tmp_path / "battles.jsonl"
    if content is not None:
        path.write_text(content)
    result = run_module("vicuna_demo.data.leaderboard", path, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error:") and message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert result.stdout == ""


def test_export_then_leaderboard_round_trip(log_dir, tmp_path):
    battles = tmp_path / "battles.jsonl"
    assert run_module("vicuna_demo.data.export", "--log-dir", log_dir, "--battles", battles, cwd=tmp_path).returncode == 0
    result = run_module("vicuna_demo.data.leaderboard", battles, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Store(log_dir, read_only=True) as store:
        expected = compute_leaderboard(store.battles())
    assert [(m["model"], m["battles"]) for m in json.loads(result.stdout)["models"]] == [
        (r.model, r.battles) for r in expected
    ]


def test_leaderboard_after_one_vote_is_provisional_with_modest_ratings(tmp_path):
    path = tmp_path / "battles.jsonl"
    path.write_text(json.dumps({"model_a": "a", "model_b": "b", "winner": "model_a"}) + "\n")
    result = run_module("vicuna_demo.data.leaderboard", path, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("1 battle between 2 models rated from")
    models = {m["model"]: m for m in json.loads(result.stdout)["models"]}
    assert all(m["provisional"] is True and m["rank"] is None for m in models.values())
    assert 1000 < models["a"]["rating"] < 1100 and 900 < models["b"]["rating"] < 1000
    assert all(m["ci_upper"] - m["ci_lower"] > 300 for m in models.values())

    table = run_module("vicuna_demo.data.leaderboard", path, cwd=tmp_path).stdout.splitlines()
    assert table[1] == "provisional (fewer than 20 battles, not ranked):"
    assert all("too few votes" in line and line.split()[0] == "-" for line in table[2:])
    assert "+0/-0" not in "\n".join(table)


def test_leaderboard_min_battles_splits_ranked_from_provisional_models(tmp_path):
    path = tmp_path / "battles.jsonl"
    rows = ([{"model_a": "old", "model_b": "older", "winner": "model_a"}] * 15
            + [{"model_a": "older", "model_b": "old", "winner": "model_a"}] * 10
            + [{"model_a": "new", "model_b": "old", "winner": "model_b"}] * 3)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_module("vicuna_demo.data.leaderboard", path, "--json", "--min-battles", "25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["min_battles"] == 25
    assert {m["model"]: (m["battles"], m["rank"], m["provisional"]) for m in printed["models"]} == {
        "old": (28, 1, False), "older": (25, 1, False), "new": (3, None, True)}
    lines = run_module("vicuna_demo.data.leaderboard", path, "--min-battles", "25", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:3]] == [["1", "old"], ["1", "older"]]
    assert lines[3] == "provisional (fewer than 25 battles, not ranked):"
    assert lines[4].split()[:2] == ["-", "new"] and "too few votes" in lines[4]
    assert len({len(line) for line in lines[1:3] + lines[4:]}) == 1  # one aligned table
    bad = run_module("vicuna_demo.data.leaderboard", path, "--min-battles", "-1", cwd=tmp_path)
    assert bad.returncode != 0 and "--min-battles must be >= 0" in bad.stderr


def test_leaderboard_skips_a_model_against_itself_and_says_so(tmp_path):
    path = tmp_path / "battles.jsonl"
    path.write_text(json.dumps({"model_a": "a", "model_b": "a", "winner": "model_a"}) + "\n")
    result = run_module("vicuna_demo.data.leaderboard", path, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 battles between 0 models" in result.stderr
    assert "skipped 1 row (1 same model on both sides)" in result.stderr
    assert json.loads(result.stdout)["models"] == []


def test_agreement_cli_reads_the_store_and_an_export_and_gives_fastchats_numbers(tmp_path):
    """Judge versus visitors from the command line: the battles with both a first human vote and a judge
    verdict (the latest that gave one), from the store and from its export, with Cohen's kappa."""
    logs = tmp_path / "logs"
    judged = {"b1": "model_a", "b2": "model_b", "b3": "tie", "b4": "model_b", "b5": "model_a", "b6": "model_a",
              "b7": "no_verdict", "b8": "model_a"}
    human = {"b1": "model_a", "b2": "model_a", "b3": "tie (bothbad)", "b4": "model_b", "b5": "tie",
             "b6": "model_a", "b7": "model_a"}                       # b8: no human vote; b7: no verdict
    with Store(logs) as store:
        store.log_judge_vote(judge_vote("b2", "model_a", ("b2-a", "b2-b"), tstamp=2500.0))   # asked again below
        for battle, winner in judged.items():
            g = None if winner == "no_verdict" else winner
            store.log_judge_vote(judge_vote(battle, winner, (f"{battle}-a", f"{battle}-b"), tstamp=3000.0, g1=g, g2=g,
                                            error="judge down" if g is None else None))
        for battle, winner in human.items():
            store.log_vote(vote(battle, "vicuna-7b", "smollm2", winner))
        store.log_vote(vote("b1", "vicuna-7b", "smollm2", "model_b"))     # a second vote: only the first counts
    expected = {"with_ties": {"n": 6, "agree": 4, "rate": 0.6667, "kappa": 0.4783},
                "without_ties": {"n": 4, "agree": 3, "rate": 0.75, "kappa": 0.5}}
    done = run_module("vicuna_demo.data.agreement", "--log-dir", logs, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {k: v for k, v in json.loads(done.stdout).items() if k != "source"} == expected
    done = run_module("vicuna_demo.data.agreement", cwd=tmp_path)          # the app's default folder: logs
    assert done.returncode == 0 and "with ties: 4 of 6 agree (66.7%), Cohen's kappa 0.478" in done.stdout
    exported = run_module("vicuna_demo.data.export", "--log-dir", logs, "--battles", tmp_path / "battles.jsonl",
                          "--judge-votes", tmp_path / "judge.jsonl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    from vicuna_demo.data.agreement import agreement_stats, main, pairs_from_files
    assert agreement_stats(pairs_from_files(tmp_path / "battles.jsonl", tmp_path / "judge.jsonl")) == expected
    (tmp_path / "bad.jsonl").write_text('{"question_id": "b1"}\nnot json\n')
    assert main(["--battles", str(tmp_path / "bad.jsonl"), "--judge-votes", str(tmp_path / "judge.jsonl")]) == 1
    assert main(["--log-dir", str(tmp_path / "nowhere")]) == 1
