"""README.md stays true: it opens with the two commands (and .ci/run runs the test one), its flags
table is what scripts/flags_table.py generates from vicuna_demo.config, its file tree lists every
tracked .py file and nothing that is gone, and its relative links point at files that exist."""

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
