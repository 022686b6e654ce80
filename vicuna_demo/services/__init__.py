"""Services below the UI: every behaviour of the app is one call into them; no gradio here.

    chat.py      ChatService: the only path from a visitor's text to a model (limits, moderation, log)
    arena.py     anonymous battles: pairing, identity leaks, what a vote means and whether it counts
    runtime.py   settings -> loaded models, started engines, moderator, store and ChatService
"""
