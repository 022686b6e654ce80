"""Assemble the tabs into one gr.Blocks app with the banners (offline model, moderation off), each shown once."""

from __future__ import annotations

import gradio as gr

from ..services.battle import BattleService
from ..services.chat import ChatService
from ..services.judge import JudgeService
from .chat_tab import build_chat_tab
from .compare_tab import build_compare_tab
from .evaluate_tab import build_evaluate_tab
from .leaderboard_tab import build_leaderboard_tab

TITLE = "Vicuna demo"


def warmup_lines(service: ChatService) -> list[str]:
    """Status of every engine still warming up (engines without a warm-up, e.g. remote ones, count as ready)."""
    return [str(getattr(engine, "status", "")) for engine in service.engines.values()
            if not getattr(engine, "ready", True)]


def _warmup_status(service: ChatService) -> None:
    """A line that shows start-up progress (loading, CUDA graphs, warm-up) until every model is ready.

    Requests sent meanwhile wait for the warm-up instead of compiling inside a visitor's reply."""
    def text() -> str:
        lines = warmup_lines(service)
        return "⏳ Getting ready (replies start when this is done):\n" + "\n".join(f"- {l}" for l in lines) \
            if lines else ""

    def refresh():
        current = text()
        return gr.update(value=current, visible=bool(current)), gr.Timer(active=bool(current))

    initial = text()
    status = gr.Markdown(initial, visible=bool(initial), elem_id="warmup-status")
    timer = gr.Timer(1.0, active=bool(initial))
    timer.tick(refresh, None, [status, timer], api_name=False, queue=False, show_progress="hidden")


def build_ui(service: ChatService, settings, banners: list[str] | tuple[str, ...] = (),
             battles: BattleService | None = None, judge: JudgeService | None = None) -> gr.Blocks:
    """Build the app. ``banners`` are notices every visitor must see (e.g. moderation is off); ``battles`` is
    the runtime's battle service (built here from ``settings`` when not given)."""
    battles = battles or BattleService.from_settings(service, settings)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# 🦙 {TITLE}\nChat with open models, compare them side by side, and vote.")
        for text in dict.fromkeys(banners):  # two embedded models share one note
            gr.Markdown(f"> ⚠️ {text}", elem_classes=["banner"])
        _warmup_status(service)
        with gr.Tabs():
            with gr.Tab("💬 Chat", id="chat"):
                build_chat_tab(service)
            with gr.Tab("⚔️ Arena (anonymous)", id="arena"):
                build_compare_tab(battles, anonymous=True)
            with gr.Tab("👥 Side by side", id="compare"):
                build_compare_tab(battles, anonymous=False)
            with gr.Tab("🏆 Leaderboard", id="leaderboard") as leaderboard:
                build_leaderboard_tab(service, settings, leaderboard)
            with gr.Tab("📋 Evaluate", id="evaluate"):
                build_evaluate_tab(service, judge or JudgeService.from_settings(service, settings), settings)
    return demo
