"""The "⚖️ Ask the judge" button of the side-by-side tab, and the panel that shows the judge at work.

After a round, the button asks ``JudgeService.judge_battle`` for a verdict on the visitor's battle:
both answer orders stream side by side in the panel (the judge's reasoning), then the verdict, which
counts only when both orders agree (the panel says when they did not, and that it is then a tie).
The verdict is stored as a judge vote, never as the visitor's vote. Without ``--judge`` the button and the
panel are hidden, and the API event answers that there is no judge. API name (gradio_client):
``/compare_judge() -> panel markdown``.
"""

from __future__ import annotations

import gradio as gr

from ..services.judge import GAMES, JudgeService, JudgeUpdate
from .common import client_hash

CURSOR = "▌"
ORDER_TITLES = {"g1": "Order 1: Model A's answer shown first", "g2": "Order 2: Model B's answer shown first"}


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or " ").splitlines() or [" "])


def render(judge: JudgeService, battle, update: JudgeUpdate) -> str:
    """The panel's markdown for one update of the judge on ``battle``."""
    if update.error and update.verdict is None:
        return f"⚖️ {update.error}"
    head = (f"### ⚖️ {judge.judge} judges the last round: Model A ({battle.a.model}) vs Model B "
            f"({battle.b.model})")
    parts = [head]
    note = judge.self_judging_note(battle.a.model, battle.b.model)
    if note:
        parts.append(f"*{note}*")
    for game in GAMES:
        text = update.texts.get(game, "") + ("" if update.done else CURSOR)
        parts.append(f"**{ORDER_TITLES[game]}**\n\n{_quote(text)}")
    if update.done:
        if update.error:
            parts.append(f"⚠️ {update.error}")
        parts.append(f"**Verdict:** {update.explanation}")
    return "\n\n".join(parts)


def add_judge_panel(judge: JudgeService, state: gr.State, service) -> None:
    """The button and the panel, below the vote buttons of the side-by-side tab (``state`` holds the Battle)."""
    # without a judge there is nothing to ask: both stay hidden (the API event remains and says there is none)
    button = gr.Button("⚖️ Ask the judge", elem_id="compare-judge", variant="secondary", visible=judge.available)
    panel = gr.Markdown(elem_id="compare-judge-output", visible=judge.available)

    def ask(battle, request: gr.Request):
        if not judge.available:
            yield f"⚖️ {judge.unavailable_reason()}"
            return
        for update in judge.judge_battle(battle, client_hash(service, request)):
            yield render(judge, battle, update)

    button.click(ask, [state], [panel], api_name="compare_judge", concurrency_id="judge", concurrency_limit=4)
