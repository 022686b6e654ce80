"""Category labels of a battle's first prompt (data/categories.py), stored with the vote, exported, and
read by the leaderboard command line's --category.

Run: .venv/bin/python -m pytest tests/test_categories.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vicuna_demo.data.categories import is_code, labels_from_row, language, rule_labels

ROOT = Path(__file__).resolve().parents[1]


def test_rules_label_code_turns_length_and_language():
    assert rule_labels("What is the capital of France?", 1) == ["lang:en"]
    assert rule_labels("Quelle est la capitale de la France ?", 3) == ["multi_turn", "lang:fr"]
    labels = rule_labels("Pourquoi ce code plante-t-il ?\n```python\nprint(1/0)\n```", 1)
    assert labels == ["code", "lang:fr"]  # the language of the prose, not of the code
    assert "long_query" in rule_labels("word " * 600, 1)


def test_code_is_recognised_without_a_fence():
    assert is_code("def add(a, b):\n    return a + b")
    assert is_code("int x = 1;\nint y = 2;")
    assert not is_code("Tell me a story about a dragon; make it short.")


def test_short_or_uncertain_prompts_get_no_language():
    assert language("hi") is None
    assert language("") is None


def test_fastchat_rows_give_labels_from_their_own_fields():
    assert labels_from_row({"is_code": True, "turn": 2, "language": "English"}) == {"code", "multi_turn",
                                                                                    "lang:English"}
    assert labels_from_row({"categories": ["lang:de"], "is_code": True}) == {"lang:de"}


def test_cli_rates_one_category(tmp_path):
    rows = ([{"model_a": "a", "model_b": "b", "winner": "model_a", "categories": ["code"]}] * 30
            + [{"model_a": "a", "model_b": "b", "winner": "model_b", "categories": ["lang:en"]}] * 30)
    path = tmp_path / "battles.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run([sys.executable, "-m", "vicuna_demo.data.leaderboard", str(path), "--json",
                             "--category", "code", "--bootstrap", "0"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)["models"]
    assert [m["model"] for m in models] == ["a", "b"] and models[0]["battles"] == 30
    assert "30 not in category code" in result.stderr


def test_fastchat_category_tags_give_the_judge_labels():
    from vicuna_demo.data.categories import HARD_CRITERIA, category_tag

    answer = {**{key: True for key in HARD_CRITERIA}, "math": True, "creative_writing": False,
              "instruction_following": True}
    assert labels_from_row({"category_tag": category_tag(answer), "is_code": False}) == {
        "math", "instruction_following", "hard_prompt"}
    five = {**answer, "specificity": False, "complexity": False}
    assert "hard_prompt" not in labels_from_row({"category_tag": category_tag(five)})
