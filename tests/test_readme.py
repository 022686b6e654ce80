"""README.md stays true: it opens with the two commands (and .ci/run runs the test one), its flags
table is what scripts/flags_table.py generates from vicuna_demo.config, its file tree lists every
tracked .py file and nothing that is gone, and its relative links point at files that exist. Speed figures are
not copied into it or docs/performance.md: both link to the tables of benchmarks/RESULTS.md, the one page
generated from the raw results, and every such link names a table that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
sys.path.insert(0, str(REPO / "scripts"))

import file_tree  # noqa: E402
import flags_table  # noqa: E402


def test_readme_opens_with_the_run_and_test_commands_and_ci_runs_both():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/run.sh", "bash scripts/test.sh"]
    assert README.index("```bash") < README.index("## ")  # before any section
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    # first the run command, in its own environment, answering one real turn; then the test command unchanged
    self_test = re.search(r"^bash scripts/run\.sh --self-test$", ci, re.M)
    tests = re.search(r"^exec bash scripts/test\.sh$", ci, re.M)
    assert self_test and tests and self_test.start() < tests.start()
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_flags_table_is_generated_from_the_settings():
    current = README.split(flags_table.START, 1)[1].split(flags_table.END, 1)[0]
    assert f"{flags_table.START}{current}{flags_table.END}" == flags_table.block(), \
        "README flags table is stale: run python scripts/flags_table.py --write"
    for opt in flags_table._OPTIONS:
        assert f"`{flags_table.env_name(opt)}`" in current


def test_file_tree_lists_every_tracked_python_file_and_nothing_gone():
    listed = file_tree.parse_tree(README)
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked, "not a git checkout?"
    missing = [path for path in tracked if (REPO / path).exists() and path not in listed]
    assert not missing, f"add to the README tree (python scripts/file_tree.py --write): {missing}"
    gone = [path for path in listed if not (REPO / path).exists()]
    assert not gone, f"in the README tree but gone: {gone}"
    assert all(listed[path] for path in listed), "every file gets a one-line description"


def test_relative_links_point_at_existing_files():
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (REPO / target).exists(), target


# -- figures live in benchmarks/RESULTS.md; the README and docs/performance.md link to its tables ---------------------

RESULTS = REPO / "benchmarks" / "RESULTS.md"
PERFORMANCE_PAGES = {"README.md": README, "docs/performance.md": (REPO / "docs" / "performance.md").read_text("utf-8")}
# a measured speed: a number, then tok/s, tokens/s or tokens per second (an example in `code` is not a figure)
SPEED = re.compile(r"\d[\d,.]*\s*(?:-\s*\d[\d,.]*\s*)?(?:tok/s|tokens/s|tokens per second)", re.IGNORECASE)


def prose(text: str) -> str:
    """``text`` without its fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_speed_figures_are_linked_from_results_not_copied():
    copied = {name: SPEED.findall(prose(text)) for name, text in PERFORMANCE_PAGES.items()}
    assert copied == {name: [] for name in PERFORMANCE_PAGES}, "link to the table in benchmarks/RESULTS.md instead"
    assert SPEED.findall(prose("one stream 181 tok/s; 15-23 tokens per second; e.g. `13.8 tok/s`")) == \
        ["181 tok/s", "15-23 tokens per second"]          # the rule reads what it should


def test_links_to_results_name_a_table_that_exists():
    anchors = {github_anchor(line[3:]) for line in RESULTS.read_text("utf-8").splitlines() if line.startswith("## ")}
    for name, text in PERFORMANCE_PAGES.items():
        linked = re.findall(r"RESULTS\.md#([\w\-]+)\)", text)
        assert linked, f"{name} links to no table of RESULTS.md"
        assert [a for a in linked if a not in anchors] == [], name
