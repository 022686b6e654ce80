"""``python app.py --self-test`` (the README's "does my install work?" and CI's first step): the real app answers
one chat turn per model through the page's /chat, or says which model did not and exits 1.

The first test starts the app as a user does, in a subprocess, with the modules that only requirements-dev.txt
installs (Triton, pytest, Playwright, NVRTC) made unimportable: on 2026-12-07 every reply of a fresh install
failed with "No module named 'triton'" while the suite, whose environment has Triton, stayed green.
CI also runs the self-test in an environment built from requirements.txt alone (.ci/run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import main
from tests.engines import RecordingEngine
from vicuna_demo import selftest

ROOT = Path(__file__).resolve().parents[1]
# importable in the test environment, never installed by requirements.txt
DEV_ONLY = ("triton", "pytest", "playwright", "_pytest", "nvidia")


class Starting(RecordingEngine):
    """A scripted engine with the protocol's status and readiness (ready after ``ready_after`` reads)."""

    def __init__(self, *args, ready_after=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = 0
        self.ready_after = ready_after

    @property
    def ready(self) -> bool:
        self.reads += 1
        return self.reads > self.ready_after

    @property
    def status(self) -> str:
        return f"{self.name}: {'ready' if self.reads > self.ready_after else 'loading weights'}"


@pytest.mark.slow
def test_the_run_command_answers_without_modules_only_the_tests_install(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in %r:\n    sys.modules[name] = None  # import fails as if not installed\n" % (DEV_ONLY,))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_API_KEY", None)
    done = subprocess.run([sys.executable, "app.py", "--self-test", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    assert "self-test passed: 1 of 1 model(s) answered" in printed
    assert "replied: " in printed and "tokens)" in printed
    assert "No module named" not in printed


def test_the_self_test_waits_for_models_then_reports_each_reply(launch_app, capsys):
    engines = {"Alpha": Starting("Alpha", reply="Hello there, friend.", ready_after=3),
               "Beta": Starting("Beta", reply="Hi!")}
    url, _runtime = launch_app(["--moderation", "off"], engines=engines)
    printed = []
    assert selftest.run(url, engines, say=printed.append) == 0
    assert "self-test: Alpha: loading weights" in printed          # it waited, saying so
    assert any(line.startswith("self-test: Alpha replied: 'Hello there, friend.' (") for line in printed)
    assert any(line.startswith("self-test: Beta replied: 'Hi!'") for line in printed)
    assert printed[-1].startswith("self-test passed: 2 of 2 model(s) answered through " + url)
    assert [m["content"] for m in engines["Alpha"].received[0] if m["role"] == "user"] == [selftest.PROMPT]


def test_a_model_that_fails_its_reply_fails_the_self_test_with_the_reason(launch_app):
    engines = {"Good": Starting("Good"), "Broken": Starting("Broken", fail_after=0)}
    url, _runtime = launch_app(["--moderation", "off"], engines=engines)
    printed = []
    assert selftest.run(url, engines, say=printed.append) == 1
    broken = next(line for line in printed if line.startswith("self-test: Broken did"))
    assert "did NOT reply" in broken and "injected fault" in broken
    assert printed[-1] == "self-test FAILED: 1 of 2 model(s) gave no reply"


def test_a_reply_is_read_apart_from_its_notice_and_statistics_line():
    chatbot = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "text", "text":
                "Hello!\n\n> Trimmed the oldest turn.\n\n<sub>⏱ 3 tokens · first token 0.1 s · 9.0 tok/s</sub>"}]}]
    assert selftest.read_reply(chatbot) == ("Hello!", 3, "Trimmed the oldest turn.")
    failed = [{"role": "assistant", "content": "> Generation failed: boom\n\n<sub>⏱ 0 tokens · error</sub>"}]
    assert selftest.read_reply(failed) == ("", 0, "Generation failed: boom")


def test_a_malformed_flag_still_stops_before_the_self_test(capsys):
    assert main(["--self-test", "--temperature", "9"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_a_gpu_without_triton_is_told_why_the_fast_path_runs_eager_ops(monkeypatch):
    from vicuna_demo.engines.fastpath import model
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "vicuna_demo.engines.fastpath.kernels", raising=False)
    monkeypatch.delattr(sys.modules["vicuna_demo.engines.fastpath"], "kernels", raising=False)
    problem = model._triton_problem()
    assert problem is not None and problem.startswith("Triton unavailable (") and "triton" in problem
