"""What the app keeps and what it computes from it: the store, exports, ratings and the leaderboard.

    records.py      what is stored: turn, vote and judge-verdict records, the values they take (WINNERS)
    storage.py      append-only SQLite of turns and votes (numbered migrations)
    queries.py      the store's reads: battles, judge verdicts, turns, conversations
    export.py       python -m vicuna_demo.data.export: ShareGPT conversations and clean battles
    ratings.py      Bradley-Terry ratings with bootstrap intervals, win rates (pure functions)
    leaderboard.py  python -m vicuna_demo.data.leaderboard: the leaderboard from a battles file
"""
