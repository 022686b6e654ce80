"""The leaderboard tab: ratings computed live from the stored votes.

Each refresh reads the battles from the store (``store.battles``: one vote per battle, counted ones
only; anonymous battles only unless the checkbox includes named ones), fits Bradley-Terry ratings
with bootstrap 95% intervals (``ratings.compute_leaderboard``) and draws the win-rate matrix
(``ratings.plot_win_rates``). API name: ``/leaderboard_refresh(include_named) -> (summary, table, plot)``.
"""

from __future__ import annotations

import gradio as gr

from ..services.chat import ChatService
from ..data.ratings import compute_leaderboard, plot_win_rates, win_rate_matrix
from ..data.storage import NullStore

HEADERS = ["Rank", "Model", "Rating", "95% CI", "Battles"]
NO_VOTES = ("No votes yet. Battle in the ⚔️ Arena (anonymous) tab and vote: the leaderboard is computed from "
            "the counted votes{which}.")


def leaderboard_view(store, include_named: bool) -> tuple[str, list[list], object]:
    """(summary markdown, table rows, matplotlib figure or None) from the store's counted battles."""
    if isinstance(store, NullStore):
        return ("Votes are not being kept (the app runs with `--log-dir ''`), so there is no leaderboard.", [], None)
    battles = store.battles(anony_only=not include_named)
    which = "" if include_named else " of anonymous battles (tick the box to include named comparisons)"
    if not battles:
        return NO_VOTES.format(which=which), [], None
    rows = compute_leaderboard(battles)
    models = [row.model for row in rows]
    table = [[row.rank, row.model, round(row.rating), f"+{row.ci_upper - row.rating:.0f}/"
              f"-{row.rating - row.ci_lower:.0f}", row.battles] for row in rows]
    kind = "anonymous and named" if include_named else "anonymous"
    summary = (f"**{len(battles)}** counted {kind} battle{'s' if len(battles) != 1 else ''} between "
               f"**{len(models)}** models. Bradley-Terry ratings (Chatbot Arena scale, mean 1000) with bootstrap "
               "95% intervals; rank = 1 + the number of models whose interval lies entirely above this one.")
    names, matrix = win_rate_matrix(battles, models)
    return summary, table, plot_win_rates(names, matrix)


def build_leaderboard_tab(service: ChatService, settings, tab: gr.Tab | None = None) -> None:
    """Add the tab's components; refreshed by its button, its checkbox, and (if given) selecting ``tab``."""
    with gr.Row():
        include_named = gr.Checkbox(False, label="Include named (👥 Side by side) battles",
                                    elem_id="leaderboard-include-named")
        refresh = gr.Button("🔄 Refresh", elem_id="leaderboard-refresh", scale=0)
    summary = gr.Markdown(NO_VOTES.format(which=""), elem_id="leaderboard-summary")
    table = gr.Dataframe(headers=HEADERS, datatype=["number", "str", "number", "str", "number"],
                         interactive=False, elem_id="leaderboard-table")
    plot = gr.Plot(label="Win rate (row model against column model)", elem_id="leaderboard-plot")

    def refresh_fn(include: bool):
        text, rows, figure = leaderboard_view(service.store, bool(include))
        return text, {"headers": HEADERS, "data": rows}, figure

    refresh.click(refresh_fn, [include_named], [summary, table, plot], api_name="leaderboard_refresh",
                  concurrency_id="leaderboard", concurrency_limit=2)
    include_named.change(refresh_fn, [include_named], [summary, table, plot], api_name=False,
                         concurrency_id="leaderboard", concurrency_limit=2)
    if tab is not None:
        tab.select(refresh_fn, [include_named], [summary, table, plot], api_name=False,
                   concurrency_id="leaderboard", concurrency_limit=2)
