"""What the app keeps and what it computes from it: the store, exports, ratings and the leaderboard.

    records.py      what is stored: turn, vote and judge-verdict records, the values they take (WINNERS)
    backends.py     where the store lives: the SQLite file or a PostgreSQL URI (SQLAlchemy engines, locks)
    storage.py      append-only store of turns and votes, SQLite or PostgreSQL (numbered migrations)
    shared.py       state replicas share through PostgreSQL: rate limits, the evaluation slot
    migrate.py      python -m vicuna_demo.data.migrate: copy an SQLite store into PostgreSQL
    queries.py      the store's reads: battles, judge verdicts, turns, conversations
    export.py       python -m vicuna_demo.data.export: ShareGPT conversations and clean battles
    ratings.py      Bradley-Terry ratings with bootstrap intervals, win rates (pure functions)
    leaderboard.py  python -m vicuna_demo.data.leaderboard: the leaderboard from a battles file
"""
