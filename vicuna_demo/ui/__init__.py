"""The gradio layer: thin tabs over ``ChatService``. Delete this package and the rest still works."""

from .app import build_ui

__all__ = ["build_ui"]
