"""The store's reads: votes as battles for the ratings, judge verdicts, turns and conversations for export.

``StoreQueries`` is a mixin of ``storage.Store``: each method is one SQLAlchemy Core query (the same on
SQLite and PostgreSQL) through the store's ``_read`` (which opens the connection when needed and returns no
rows on trouble, as storage.py's docstring says), and shapes the rows with records.py.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from .records import (JSON_VOTE_COLUMNS, JUDGE_COLUMNS, LABEL_COLUMNS, TURN_COLUMNS, VOTE_COLUMNS, TurnRecord,
                      content_text, is_moderated, last_user_text, turn_from_row)
from .style import StyleCounts, count_replies, vectors_from_metadata


def _table(name: str, columns: tuple[str, ...]) -> sa.TableClause:
    return sa.table(name, sa.column("id"), *map(sa.column, columns))


TURNS = _table("turns", TURN_COLUMNS)
VOTES = _table("votes", VOTE_COLUMNS)
JUDGE_VOTES = _table("judge_votes", JUDGE_COLUMNS)
BATTLE_LABELS = _table("battle_labels", LABEL_COLUMNS)
VOTE_FLAGS = _table("vote_flags", ("battle_id", "tstamp", "reason"))
MAX_IN_LIST = 500  # ids a query names in one IN (...): SQLite allows 32,766 bound values, PostgreSQL 65,535


class StoreQueries:
    """Reading methods of ``storage.Store`` (needs ``self._read(statement) -> list of row mappings``)."""

    def _read(self, statement: sa.Executable | str, params: tuple = ()) -> list:  # pragma: no cover - Store's
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
                for r in self._vote_query(anony_only, counted_only, True, "model_a, model_b, winner")]

    def vote_rows(self, *, anony_only: bool = False, counted_only: bool = False,
                  first_per_battle: bool = True) -> list[dict]:
        """Votes as dicts with VoteRecord's field names, oldest first (first vote per battle). A vote flagged
        later (``vote_flags``) reads as not counted, the flag's reason added to ``not_counted_reason``."""
        flags = self.vote_flags()
        rows = []
        for r in self._vote_query(anony_only, counted_only, first_per_battle):
            row = {c: bool(r[c]) if c in ("anony", "counted") else
                   (None if r[c] is None else json.loads(r[c])) if c in JSON_VOTE_COLUMNS else r[c]
                   for c in VOTE_COLUMNS}
            if row["battle_id"] in flags:
                row["counted"] = False
                row["not_counted_reason"] = ",".join(filter(None, [row["not_counted_reason"], flags[row["battle_id"]]]))
            rows.append(row)
        return rows

    def counted_choices(self, *, anony_only: bool = True) -> list[dict]:
        """The counted votes (first per battle, oldest first) as dicts of battle_id, client_hash, model_a, model_b
        and winner only: what the outlier-voter check reads, without decoding each vote's JSON columns (10x
        faster than ``vote_rows`` at 100k votes)."""
        columns = ("battle_id", "client_hash", "model_a", "model_b", "winner")
        return [{c: r[c] for c in columns} for r in self._vote_query(anony_only, True, True, ", ".join(columns))]

    def vote_flags(self) -> dict[str, str]:
        """battle_id -> the reasons its vote was flagged as not counted after it was stored."""
        flags: dict[str, str] = {}
        for r in self._read("SELECT battle_id, reason FROM vote_flags ORDER BY id"):
            flags[r["battle_id"]] = ",".join(filter(None, [flags.get(r["battle_id"]), r["reason"]]))
        return flags

    def later_labels(self, *, after_id: int = 0, battle_ids: set[str] | None = None) -> tuple[dict[str, list], int]:
        """({battle_id: labels}, last_id): the labels given to battles after their vote (``battle_labels``,
        services/after_vote.py), every labeller's joined (labels are added, never taken back: the table is
        append-only); only rows after ``after_id``, and only for ``battle_ids`` when given."""
        query = sa.select(BATTLE_LABELS.c.id, BATTLE_LABELS.c.battle_id, BATTLE_LABELS.c.labels).where(
            BATTLE_LABELS.c.id > after_id).order_by(BATTLE_LABELS.c.id)
        if battle_ids is not None:
            if not battle_ids:
                return {}, after_id
            query = query.where(BATTLE_LABELS.c.battle_id.in_(sorted(battle_ids)))
        found: dict[str, list] = {}
        last_id = after_id
        for r in self._read(query):
            have = found.setdefault(r["battle_id"], [])
            have.extend(label for label in json.loads(r["labels"]) if label not in have)
            last_id = r["id"]
        return found, last_id

    def label_rows(self) -> list[dict]:
        """Every row of ``battle_labels`` as a dict (LabelRecord's fields, JSON decoded), oldest first."""
        return [{c: json.loads(r[c]) if c in ("labels", "answer") and r[c] is not None else r[c]
                 for c in LABEL_COLUMNS} for r in self._read(sa.select(BATTLE_LABELS).order_by(BATTLE_LABELS.c.id))]

    def style_battles(self, *, anony_only: bool = True, after_id: int = 0,
                      battle_ids: list | None = None) -> tuple[list, list, list, int]:
        """(battles, styles, labels, last_id) of the counted battles, as ``battles``, with each one's (side A,
        side B) style counts for ``ratings.fit_board`` and its category labels (a list, empty if unknown:
        the rules' labels stored with the vote and those given later, ``later_labels``): the counts stored
        with the vote, else (votes stored before they were) counted from the battle's stored replies. Only
        votes stored after row ``after_id``, so a caller can keep what it read and add the new ones (votes
        are append-only); ``last_id`` is where to go on from. ``battle_ids``: a list the battles' ids are
        appended to (a caller that keeps the battles adds labels given later with them)."""
        battles, styles, labels, missing, last_id = [], [], [], {}, after_id
        ids = []
        for r in self._vote_query(anony_only, True, True, "id, battle_id, model_a, model_b, winner, conv_metadata, "
                                  "categories, conversation_a_id, conversation_b_id", after_id):
            battles.append((r["model_a"], r["model_b"], r["winner"]))
            labels.append(json.loads(r["categories"]) if r["categories"] else [])
            ids.append(r["battle_id"])
            counts = vectors_from_metadata(json.loads(r["conv_metadata"])) if r["conv_metadata"] else None
            if counts is None:
                missing[len(styles)] = (r["conversation_a_id"], r["conversation_b_id"])
            styles.append(counts)
            last_id = r["id"]
        # a few new votes: their labels only; a first read or many new votes: every label row (no huge IN list)
        later, _ = self.later_labels(battle_ids=set(ids) if after_id and len(ids) <= MAX_IN_LIST else None)
        if later:
            labels = [have + [label for label in later.get(battle_id, ()) if label not in have]
                      for have, battle_id in zip(labels, ids)]
        if battle_ids is not None:
            battle_ids.extend(ids)
        if missing:
            replies = self.reply_counts({c for pair in missing.values() for c in pair})
            for k, (conversation_a, conversation_b) in missing.items():
                styles[k] = (replies.get(conversation_a, StyleCounts()), replies.get(conversation_b, StyleCounts()))
        return battles, styles, labels, last_id

    def reply_counts(self, conversation_ids: set[str]) -> dict[str, StyleCounts]:
        """Style counts of each conversation's replies (the latest reply per turn, as shown last)."""
        latest: dict[str, dict[int, tuple[str, int]]] = {}
        for r in self._read("SELECT conversation_id, turn_index, reply, n_tokens FROM turns ORDER BY id"):
            if r["conversation_id"] in conversation_ids:
                latest.setdefault(r["conversation_id"], {})[r["turn_index"]] = (r["reply"], r["n_tokens"])
        return {c: count_replies(turns.values()) for c, turns in latest.items()}

    def _vote_query(self, anony_only: bool, counted_only: bool, first_per_battle: bool,
                    columns: str = "*", after_id: int = 0) -> list:
        where = [f"id > {int(after_id)}"] if after_id else []
        if first_per_battle:
            where.append("id IN (SELECT MIN(id) FROM votes GROUP BY battle_id)")
        if anony_only:
            where.append("anony = 1")
        if counted_only:
            where.append("counted = 1 AND battle_id NOT IN (SELECT battle_id FROM vote_flags)")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return self._read(f"SELECT {columns} FROM votes{clause} ORDER BY id")

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
                    "n_tokens": t.n_tokens,
                } for t in ordered],
            })
        return result

    def count_turns(self) -> int:
        rows = self._read(sa.select(sa.func.count().label("n")).select_from(TURNS))
        return rows[0]["n"] if rows else 0

    def sampling_history(self) -> list[tuple[float, dict]]:
        """(tstamp, weights) of every anonymous vote that recorded its pair-sampling weights, oldest first."""
        rows = self._read("SELECT tstamp, sampling FROM votes WHERE anony = 1 AND sampling IS NOT NULL ORDER BY id")
        return [(r["tstamp"], json.loads(r["sampling"]).get("weights", {})) for r in rows]

    def count_counted_votes(self, client_hash: str, *, since: float) -> int:
        """How many counted votes one visitor identity cast since ``since`` (a Unix time): the daily cap."""
        rows = self._read("SELECT COUNT(*) AS n FROM votes WHERE client_hash = ? AND tstamp >= ? AND counted = 1",
                          (client_hash, since))
        return rows[0]["n"] if rows else 0

    def count_votes(self) -> int:
        rows = self._read(sa.select(sa.func.count().label("n")).select_from(VOTES))
        return rows[0]["n"] if rows else 0
