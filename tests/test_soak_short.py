"""The short soak that CI runs: 8 visitors use the real app (embedded model) through gradio_client for one
minute, chatting, and comparing and voting where the app has the comparison tab (benchmarks/soak.py does
the driving and the counting). Nothing may hang or be lost, and every turn sent must be in the log.

VICUNA_SOAK_SECONDS and VICUNA_SOAK_VISITORS shorten it locally (defaults 60 and 8). The long run
(32 visitors, 10 minutes) is `python benchmarks/soak.py`; its result is in docs/reliability.md.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.soak import run_soak

SECONDS = float(os.environ.get("VICUNA_SOAK_SECONDS", "60"))
VISITORS = int(os.environ.get("VICUNA_SOAK_VISITORS", "8"))


@pytest.mark.slow
def test_short_soak_loses_nothing_hangs_nothing_and_logs_every_turn_sent(embedded_engine, launch_app, tmp_path):
    log_dir = tmp_path / "soak-logs"
    url, runtime = launch_app(["--rate-limit", "0", "--moderation", "off", "--log-dir", str(log_dir)],
                              engines={"SmolLM2": embedded_engine})
    summary = run_soak(url, log_dir, os.getpid(), visitors=VISITORS, seconds=SECONDS, deadline_s=180.0,
                       think_s=(0.5, 3.0), max_tokens=(16, 32), model="SmolLM2")
    print(json.dumps(summary))
    assert summary["requests"] >= VISITORS, summary
    assert summary["hung"] == 0, summary["problems"]
    assert summary["lost"] == 0, summary["lost_examples"]
    assert summary["errors"] == 0 and summary["error_replies"] == 0, summary["problems"]
    assert summary["sent_turns"] > 0 and summary["logged_turns"] == summary["sent_turns"], summary
    assert summary["duplicated_turns"] == 0
    assert summary["votes_stored"] == summary["votes_recorded"], summary
    assert summary["stuck_visitors"] == 0
    assert summary["store_problem"] is None


def test_the_soak_counts_a_turn_missing_from_the_store_as_lost_and_an_extra_row_as_duplicated(tmp_path):
    """The counting itself can fail: a sent turn without its row is lost, a row logged twice is flagged."""
    import time

    from benchmarks.soak import check_store
    from vicuna_demo.data.storage import Store, TurnRecord

    def row(tag, side=None, battle=None):
        return TurnRecord(conversation_id=tag, turn_index=1, tstamp=time.time(), client_hash="0" * 64, model="m",
                          template="t", params={}, messages=[{"role": "user", "content": f"[{tag}] hi"}],
                          reply="ok", finish_reason="stop", n_tokens=1, ttft_s=None, tok_s=None, moderation="off",
                          moderation_categories=(), battle_id=battle, side=side)

    with Store(tmp_path) as store:
        store.log_turn(row("soak-ab12-0-1"))
        store.log_turn(row("soak-ab12-0-2", side="a", battle="b1"))   # side b of this comparison is missing
        store.log_turn(row("soak-ab12-1-1"))
        store.log_turn(row("soak-ab12-1-1"))                           # logged twice
        store.log_turn(row("soak-ffff-0-9"))                           # another run's turn: ignored
    sent = {"soak-ab12-0-1": 1, "soak-ab12-0-2": 2, "soak-ab12-1-1": 1, "soak-ab12-2-1": 1}
    result = check_store(tmp_path, "ab12", sent)
    assert result["lost"] == 2 and result["lost_examples"] == ["soak-ab12-0-2", "soak-ab12-2-1"]
    assert result["duplicated"] == 1
    assert result["logged_turns"] == 3  # of the 5 sent
