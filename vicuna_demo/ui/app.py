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
    """While any model is still starting: every model's status (loading, warm-up, ready with what it holds).
    Once all are ready: what each model holds (KV cache in tokens, conversations at once), if it says."""
    engines = list(service.engines.values())
    starting = any(not getattr(engine, "ready", True) for engine in engines)
    lines = []
    for engine in engines:
        capacity = str(getattr(engine, "capacity", "") or "")
        if starting:
            status = str(getattr(engine, "status", "") or f"{engine.name}: ready")
            lines.append(f"{status} · {capacity}" if capacity else status)
        elif capacity:
            lines.append(f"{engine.name}: {capacity}")
    return lines


def _warmup_status(service: ChatService, demo: gr.Blocks) -> None:
    """A line that shows start-up progress (loading, CUDA graphs, warm-up) until every model is ready, then
    what each local model holds at once. Each page load reads it afresh (the page is built at start-up, when
    nothing is ready yet); a timer refreshes it while anything is still starting.

    Requests sent meanwhile wait for their model instead of compiling inside a visitor's reply."""
    def text() -> tuple[str, bool]:
        lines = warmup_lines(service)
        starting = any(not getattr(engine, "ready", True) for engine in service.engines.values())
        head = "⏳ Getting ready (replies start when each model is ready):" if starting else "Models:"
        return (head + "\n" + "\n".join(f"- {line}" for line in lines) if lines else ""), starting

    def refresh():
        current, starting = text()
        return gr.update(value=current, visible=bool(current)), gr.Timer(active=starting)

    initial, starting = text()
    status = gr.Markdown(initial, visible=bool(initial), elem_id="warmup-status")
    timer = gr.Timer(1.0, active=starting)
    timer.tick(refresh, None, [status, timer], api_name=False, queue=False, show_progress="hidden")
    demo.load(refresh, None, [status, timer], api_name=False, queue=False, show_progress="hidden")


def build_ui(service: ChatService, settings, banners: list[str] | tuple[str, ...] = (),
             battles: BattleService | None = None, judge: JudgeService | None = None) -> gr.Blocks:
    """Build the app. ``banners`` are notices every visitor must see (e.g. moderation is off); ``battles`` and
    ``judge`` are the runtime's services, one per app (built here from ``settings`` only when not given: UI
    tests without a runtime)."""
    battles = battles or BattleService.from_settings(service, settings)
    judge = judge or JudgeService.from_settings(service, settings)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# 🦙 {TITLE}\nChat with open models, compare them side by side, and vote.")
        for text in dict.fromkeys(banners):  # two embedded models share one note
            gr.Markdown(f"> ⚠️ {text}", elem_classes=["banner"])
        _warmup_status(service, demo)
        with gr.Tabs():
            with gr.Tab("💬 Chat", id="chat"):
                build_chat_tab(service)
            with gr.Tab("⚔️ Arena (anonymous)", id="arena"):
                build_compare_tab(battles, anonymous=True)
            with gr.Tab("👥 Side by side", id="compare"):
                build_compare_tab(battles, anonymous=False, judge=judge)
            with gr.Tab("🏆 Leaderboard", id="leaderboard") as leaderboard:
                build_leaderboard_tab(service, settings, leaderboard)
            with gr.Tab("📋 Evaluate", id="evaluate"):
                build_evaluate_tab(service, judge, settings)
    return demo
