"""The leaderboard tab: renders ``services.leaderboard`` (ratings computed live from the stored votes).

A radio picks visitors' votes or the judge's verdicts; a checkbox includes named (side-by-side) battles;
another turns on style control (length and markdown fitted beside the ratings, coefficients in the summary).
Each refresh asks the service for (summary, table, plot) and shows them. API names:
``/leaderboard_refresh(include_named, style_control=False, category="all") -> (summary, table, plot)``
(human votes; category: code, multi_turn, long_query, lang:xx, math, creative_writing, instruction_following,
hard_prompt...) and
``/leaderboard_judge() -> (summary, table, plot)``.
"""

from __future__ import annotations

import gradio as gr

from ..services.chat import ChatService
from ..services.leaderboard import ALL_CATEGORIES, CATEGORY_CHOICES, HEADERS, LeaderboardService

VIEWS = ("human", "judge")


def build_leaderboard_tab(service: ChatService, settings, tab: gr.Tab | None = None) -> None:
    """Add the tab's components; refreshed by its button, its checkbox, and (if given) selecting ``tab``."""
    with gr.Row():
        view = gr.Radio(list(VIEWS), value="human", label="Votes", elem_id="leaderboard-view",
                        info="human: visitors' votes · judge: the judge model's verdicts")
        include_named = gr.Checkbox(False, label="Include named (👥 Side by side) battles",
                                    elem_id="leaderboard-include-named")
        style_control = gr.Checkbox(False, label="Style control (length and markdown)",
                                    elem_id="leaderboard-style-control",
                                    info="rate models as if their answers were alike in length and formatting")
        category = gr.Dropdown(list(CATEGORY_CHOICES), value=ALL_CATEGORIES, label="Category",
                               allow_custom_value=True, elem_id="leaderboard-category",
                               info="battles whose first prompt has this label (lang:fr, lang:de... can be typed)")
        refresh = gr.Button("🔄 Refresh", elem_id="leaderboard-refresh", scale=0)
    summary = gr.Markdown("Press 🔄 Refresh to see the ratings.", elem_id="leaderboard-summary")
    table = gr.Dataframe(headers=HEADERS, datatype=["str", "str", "number", "str", "number"],
                         interactive=False, elem_id="leaderboard-table")
    plot = gr.Plot(label="Win rate (row model against column model)", elem_id="leaderboard-plot")

    board = LeaderboardService(service, settings)

    def refresh_fn(include: bool, style: bool = False, label: str | None = ALL_CATEGORIES):
        text, rows, figure = board.human(bool(include), bool(style), label if isinstance(label, str) else None)
        return text, {"headers": HEADERS, "data": rows}, figure  # None: gradio's empty placeholder, not a blank figure

    def judge_fn():
        text, rows, figure = board.judge()
        return text, {"headers": HEADERS, "data": rows}, figure

    def view_fn(include: bool, style: bool, label: str, which: str):
        return judge_fn() if which == "judge" else refresh_fn(include, style, label)

    outputs = [summary, table, plot]
    pool = dict(concurrency_id="leaderboard", concurrency_limit=2)
    human_api, judge_api = gr.Button(visible=False), gr.Button(visible=False)
    human_api.click(refresh_fn, [include_named, style_control, category], outputs, api_name="leaderboard_refresh",
                    **pool)
    judge_api.click(judge_fn, None, outputs, api_name="leaderboard_judge", **pool)
    inputs = [include_named, style_control, category, view]
    for event in (refresh.click, include_named.change, style_control.change, category.change, view.change):
        event(view_fn, inputs, outputs, api_name=False, **pool)
    if tab is not None:
        tab.select(view_fn, inputs, outputs, api_name=False, **pool)
