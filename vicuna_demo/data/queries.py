"""The store's reads: votes as battles for the ratings, judge verdicts, turns and conversations for export.

``StoreQueries`` is a mixin of ``storage.Store``: each method is one SQLAlchemy Core query (the same on
SQLite and PostgreSQL) through the store's ``_read`` (which opens the connection when needed and returns no
rows on trouble, as storage.py's docstring says), and shapes the rows with records.py.
"""

from __future__ import annotations

import sqlalchemy as sa

from .records import (JUDGE_COLUMNS, TURN_COLUMNS, VOTE_COLUMNS, TurnRecord, content_text, is_moderated,
                      last_user_text, turn_from_row)


def _table(name: str, columns: tuple[str, ...]) -> sa.TableClause:
    return sa.table(name, sa.column("id"), *map(sa.column, columns))


TURNS = _table("turns", TURN_COLUMNS)
VOTES = _table("votes", VOTE_COLUMNS)
JUDGE_VOTES = _table("judge_votes", JUDGE_COLUMNS)


class StoreQueries:
    """Reading methods of ``storage.Store`` (needs ``self._read(statement) -> list of row mappings``)."""

    def _read(self, statement: sa.Executable) -> list:  # pragma: no cover - Store's
        raise NotImplementedError

    def judge_vote_rows(self) -> list[dict]:
        """Every judge verdict as a dict with JudgeVoteRecord's field names, oldest first."""
        return [{c: r[c] for c in JUDGE_COLUMNS} for r in self._read(sa.select(JUDGE_VOTES).order_by(JUDGE_VOTES.c.id))]

    def judge_battles(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, winner) per judged round, for ``compute_leaderboard``: the latest verdict
        per battle (a round judged again replaces the earlier verdict), rounds without a verdict left out."""
        latest: dict[str, dict] = {}
        for row in self.judge_vote_rows():
            latest[row["battle_id"]] = row
        return [(r["model_a"], r["model_b"], r["winner"]) for r in latest.values() if r["winner"] != "no_verdict"]

    def judge_human_pairs(self) -> list[tuple[str, str]]:
        """(judge winner, human winner) for every battle that has both a judge verdict (the latest, not
        "no_verdict") and a human vote (the first), oldest battle first. The judge judged the battle's
        latest round; the human vote came after whatever rounds the visitor saw."""
        judged = {}
        for row in self.judge_vote_rows():
            judged[row["battle_id"]] = row["winner"]
        pairs = []
        for vote in self.vote_rows(anony_only=False, counted_only=False, first_per_battle=True):
            winner = judged.get(vote["battle_id"])
            if winner is not None and winner != "no_verdict":
                pairs.append((winner, vote["winner"]))
        return pairs

    def battles(self, *, anony_only: bool = True, counted_only: bool = True) -> list[tuple[str, str, str]]:
        """(model_a, model_b, winner) per battle, oldest first, for ``compute_leaderboard``.

        One vote per battle: the first recorded for a battle_id (later ones are ignored).
        """
        return [(r["model_a"], r["model_b"], r["winner"])
                for r in self._vote_query(anony_only, counted_only, first_per_battle=True)]

    def vote_rows(self, *, anony_only: bool = False, counted_only: bool = False,
                  first_per_battle: bool = True) -> list[dict]:
        """Votes as dicts with VoteRecord's field names, oldest first (first vote per battle)."""
        return [{c: bool(r[c]) if c in ("anony", "counted") else r[c] for c in VOTE_COLUMNS}
                for r in self._vote_query(anony_only, counted_only, first_per_battle)]

    def _vote_query(self, anony_only: bool, counted_only: bool, first_per_battle: bool) -> list:
        query = sa.select(VOTES).order_by(VOTES.c.id)
        if first_per_battle:
            query = query.where(VOTES.c.id.in_(sa.select(sa.func.min(VOTES.c.id)).group_by(VOTES.c.battle_id)))
        if anony_only:
            query = query.where(VOTES.c.anony == 1)
        if counted_only:
            query = query.where(VOTES.c.counted == 1)
        return self._read(query)

    def turns(self, conversation_id: str | None = None) -> list[TurnRecord]:
        """Every stored turn (regenerations included), in insertion order."""
        query = sa.select(TURNS).order_by(TURNS.c.id)
        if conversation_id is not None:
            query = query.where(TURNS.c.conversation_id == conversation_id)
        rows = self._read(query)
        return [turn_from_row(r) for r in rows]

    def conversations(self) -> list[dict]:
        """Latest state of each conversation, oldest conversation first.

        Each dict: conversation_id, model, template, client_hash, battle_id, side, tstamp (last
        turn), n_turns, ``messages`` (the last turn's messages plus its reply as an assistant
        message), ``system`` (its system text or None) and ``turns``: per turn_index the latest
        row (a regeneration replaces the earlier reply) as {turn_index, tstamp, user, reply,
        finish_reason, moderation, moderation_categories, moderated, error}. ``turns`` keeps
        every exchange even when context fitting dropped old messages from ``messages``.
        """
        latest: dict[str, dict[int, TurnRecord]] = {}
        for turn in self.turns():
            latest.setdefault(turn.conversation_id, {})[turn.turn_index] = turn
        result = []
        for conversation_id, by_index in latest.items():
            ordered = [by_index[i] for i in sorted(by_index)]
            last = ordered[-1]
            system = next((content_text(m.get("content")) for m in last.messages if m.get("role") == "system"), None)
            result.append({
                "conversation_id": conversation_id,
                "model": last.model,
                "template": last.template,
                "client_hash": last.client_hash,
                "battle_id": last.battle_id,
                "side": last.side,
                "tstamp": last.tstamp,
                "n_turns": len(ordered),
                "system": system,
                "messages": [*last.messages, {"role": "assistant", "content": last.reply}],
                "turns": [{
                    "turn_index": t.turn_index,
                    "tstamp": t.tstamp,
                    "user": last_user_text(t.messages),
                    "reply": t.reply,
                    "finish_reason": t.finish_reason,
                    "moderation": t.moderation,
                    "moderation_categories": list(t.moderation_categories),
                    "moderated": is_moderated(t),
                    "error": t.error,
                } for t in ordered],
            })
        return result

    def count_turns(self) -> int:
        rows = self._read(sa.select(sa.func.count().label("n")).select_from(TURNS))
        return rows[0]["n"] if rows else 0

    def count_votes(self) -> int:
        rows = self._read(sa.select(sa.func.count().label("n")).select_from(VOTES))
        return rows[0]["n"] if rows else 0
