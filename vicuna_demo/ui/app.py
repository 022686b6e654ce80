"""Assemble the tabs into one gr.Blocks app with the banners (offline model, moderation off)."""

from __future__ import annotations

import gradio as gr

from ..chat import ChatService
from .chat_tab import build_chat_tab
from .compare_tab import build_compare_tab
from .leaderboard_tab import build_leaderboard_tab

TITLE = "Vicuna demo"


def build_ui(service: ChatService, settings, banners: list[str] | tuple[str, ...] = ()) -> gr.Blocks:
    """Build the app. ``banners`` are notices every visitor must see (e.g. moderation is off)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# 🦙 {TITLE}\nChat with open models, compare them side by side, and vote.")
        for text in banners:
            gr.Markdown(f"> ⚠️ {text}", elem_classes=["banner"])
        with gr.Tabs():
            with gr.Tab("💬 Chat", id="chat"):
                build_chat_tab(service, settings)
            with gr.Tab("⚔️ Arena (anonymous)", id="arena"):
                build_compare_tab(service, settings, anonymous=True)
            with gr.Tab("👥 Side by side", id="compare"):
                build_compare_tab(service, settings, anonymous=False)
            with gr.Tab("🏆 Leaderboard", id="leaderboard") as leaderboard:
                build_leaderboard_tab(service, settings, leaderboard)
    return demo
