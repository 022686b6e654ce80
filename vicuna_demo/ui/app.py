"""Assemble the tabs into one gr.Blocks app: a title with a light/dark toggle, the notices every visitor must see
(offline model, moderation off; one short line each, each once), one status line per model with the details
in a closed accordion, then the tabs."""

from __future__ import annotations

import gradio as gr

from ..services.battle import BattleService
from ..services.chat import ChatService
from ..services.judge import JudgeService
from ..services.status import model_statuses, starting
from .chat_tab import build_chat_tab
from .compare_tab import build_compare_tab
from .evaluate_tab import build_evaluate_tab
from .leaderboard_tab import build_leaderboard_tab

TITLE = "Vicuna demo"
THEME_KEY = "vicuna-demo-theme"
# gradio marks dark mode with the "dark" class on <body> (its ?__theme=dark does the same); the choice is kept in
# localStorage and applied again on every page load
TOGGLE_THEME_JS = f"""() => {{
  const dark = !document.body.classList.contains('dark');
  document.body.classList.toggle('dark', dark);
  try {{ localStorage.setItem('{THEME_KEY}', dark ? 'dark' : 'light'); }} catch (e) {{}}
}}"""
RESTORE_THEME_JS = f"""() => {{
  let saved = null;
  try {{ saved = localStorage.getItem('{THEME_KEY}'); }} catch (e) {{}}
  if (saved === 'dark' || saved === 'light') document.body.classList.toggle('dark', saved === 'dark');
}}"""
ICONS = {"ready": "✅", "failed": "❌", "starting": "⏳"}
# Passed to launch() (gradio 6 takes css there): small notices; on a phone the chatbot leaves room for the box
# under it, so the first screen shows where to type.
CSS = """
#notices p { font-size: var(--text-sm); margin: 0; }
#app-title h3 { margin: 0; }
#model-status { padding: var(--size-1) var(--size-3); }
#model-status > .label-wrap { font-size: var(--text-sm); text-align: left; }
#model-status > .label-wrap > span:first-child { white-space: pre-line; flex: 1 1 auto; min-width: 0; }
#model-status > .label-wrap > .icon { flex: none; align-self: center; }
@media (max-width: 640px) {
  #chatbot { height: 36vh !important; max-height: 36vh; }
}
"""


def status_lines(service: ChatService) -> tuple[str, str, bool]:
    """(one short line per model, the details behind them, still starting?). The short ones, for everyone:
    ``Vicuna-7B · ✅ ready`` / ``SmolLM2 · ⏳ loading weights``; the details, for whoever opens them: each
    model's full start-up status while it starts, then what it holds at once (KV cache)."""
    statuses = model_statuses(service)
    short, details = [], []
    for s in statuses:
        icon = ICONS["ready" if s.ready else "failed" if s.failed else "starting"]
        short.append(f"{s.name} · {icon} {s.state}")
        if s.detail:
            details.append(f"- {s.name}: {s.detail}")
    still = starting(statuses)
    if still:
        short[-1] += " (replies start when it is ready)" if len(short) == 1 else ""
        short += [] if len(short) == 1 else ["Replies start when each model is ready."]
    return "\n".join(short), "\n".join(details) or "Nothing more to tell.", still


def _model_status(service: ChatService, demo: gr.Blocks) -> None:
    """The label of a closed accordion, one short line per model (loading, warming up, ready);
    inside, the full start-up status and what each model holds. Each page load reads them afresh (the page is
    built at start-up, when nothing is ready yet); a timer refreshes them while anything is still starting.

    Requests sent meanwhile wait for their model instead of compiling inside a visitor's reply."""
    def refresh():
        line, details, still = status_lines(service)
        return {status: gr.Accordion(label=line), detail: details, timer: gr.Timer(active=still)}

    line, details, still = status_lines(service)
    with gr.Accordion(line, open=False, elem_id="model-status") as status:
        detail = gr.Markdown(details, elem_id="model-details")
    timer = gr.Timer(1.0, active=still)
    timer.tick(refresh, None, [status, detail, timer], api_name=False, queue=False, show_progress="hidden")
    demo.load(refresh, None, [status, detail, timer], api_name=False, queue=False, show_progress="hidden")


def _header(banners) -> None:
    """The title with the light/dark toggle, and the notices every visitor must see, one short line each."""
    with gr.Row(equal_height=True):
        gr.Markdown(f"### 🦙 {TITLE}", elem_id="app-title")
        gr.Button("🌓", elem_id="theme-toggle", size="sm", scale=0, min_width=48,
                  variant="secondary").click(None, None, None, js=TOGGLE_THEME_JS)
    notices = list(dict.fromkeys(banners))  # two embedded models share one note
    gr.Markdown("  \n".join(f"⚠️ {text}" for text in notices), visible=bool(notices), elem_id="notices",
                elem_classes=["banner"])


def build_ui(service: ChatService, settings, banners: list[str] | tuple[str, ...] = (),
             battles: BattleService | None = None, judge: JudgeService | None = None) -> gr.Blocks:
    """Build the app. ``banners`` are notices every visitor must see (e.g. moderation is off); ``battles`` and
    ``judge`` are the runtime's services, one per app (built here from ``settings`` only when not given: UI
    tests without a runtime)."""
    battles = battles or BattleService.from_settings(service, settings)
    judge = judge or JudgeService.from_settings(service, settings)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        _header(banners)
        _model_status(service, demo)
        demo.load(None, None, None, js=RESTORE_THEME_JS)
        with gr.Tabs():
            with gr.Tab("💬 Chat", id="chat"):
                build_chat_tab(service, demo)
            with gr.Tab("⚔️ Arena (anonymous)", id="arena"):
                build_compare_tab(battles, anonymous=True)
            with gr.Tab("👥 Side by side", id="compare"):
                build_compare_tab(battles, anonymous=False, judge=judge)
            with gr.Tab("🏆 Leaderboard", id="leaderboard") as leaderboard:
                build_leaderboard_tab(service, settings, leaderboard)
            with gr.Tab("📋 Evaluate", id="evaluate") as evaluate:
                build_evaluate_tab(service, judge, settings, evaluate)
        _stop_work_of_closed_pages(demo, judge)
    return demo


def _stop_work_of_closed_pages(demo: gr.Blocks, judge: JudgeService) -> None:
    """A closed (or reloaded) page stops its evaluation at once. gradio closes an event's generator only when it
    next yields, which a slow model's evaluation may not do for minutes; the page's heartbeat stream, though,
    ends with the page, and gradio then runs the ``unload`` listeners with that page's session."""

    def page_closed(request: gr.Request):
        judge.stop_evaluation(getattr(request, "session_hash", None))

    demo.unload(page_closed)
