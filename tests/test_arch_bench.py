"""benchmarks/arch_bench.py measures each architecture through the app's own start-up.

Its ``--tiny`` run (2-layer twins on CPU) takes the GPU run's path: random model -> checkpoint folder -> the
app's ``build_runtime`` on it -> streams through the engine it started -> runtime stopped, checkpoint deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_serves_the_architecture_through_the_app_start_up_and_deletes_its_checkpoint(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    result = subprocess.run([sys.executable, "benchmarks/arch_bench.py", "--tiny", "--archs", "gemma3-12b",
                             "--stages", "fast", "--models-dir", str(tmp_path), "--budget-s", "100"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in records if r["stage"].endswith("_failed")]
    assert not failed, failed
    startup = next(r for r in records if r["stage"] == "fast_startup")
    assert startup["backend"] == "fast"
    assert startup["argv"][:2] == ["--model", startup["argv"][1]] and ",name=gemma3-12b," in startup["argv"][1]
    stopped = next(r for r in records if r["stage"] == "fast_stopped")
    assert stopped["model_freed"], "the app's weights are gone before the baselines load theirs"
    summary = next(r for r in records if r["stage"] == "summary")
    assert summary["backend"] == "fast" and summary["startup_s"] >= 0
    assert summary["fast_tok_s"]["1"] > 0 and summary["fast_tok_s"]["4"] > 0
    assert summary["kv_tokens_same_memory"] > 0 and summary["kv_tokens_app"] > 0
    assert summary["kv_vs_vicuna_7b"] == 1.0, "the 2-layer twins share one KV shape"
    assert list(tmp_path.iterdir()) == [], "the checkpoint folder is deleted"
