"""The gradio layer: thin tabs over ``ChatService``. Delete this package and the rest still works."""

from .app import CSS, build_ui

__all__ = ["CSS", "build_ui"]
