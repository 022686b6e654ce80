"""Services below the UI: every behaviour of the app is one call into them; no gradio here.

    chat.py      ChatService.turn: the only path from a visitor's text to a model (gate, limits, a frozen
                 snapshot of the messages, moderation of exactly that text, engine, log)
    session.py   a visitor's conversation: exchanges, Stop, and the one-generating-event-at-a-time gate
    battle.py    BattleService: two models side by side or anonymous, both streaming, moderated once, votes
    arena.py     anonymous battles: pairing, identity leaks, what a vote means and whether it counts
    identity.py  who the visitor is (the TCP peer, or a trusted proxy's X-Forwarded-For)
    judge.py     JudgeService: an LLM judge for side-by-side rounds and evaluations
    runtime.py   settings -> loaded models, started engines, moderator, store, ChatService, BattleService
"""
