"""Export the demo's store (see storage.py; SQLite or PostgreSQL) as JSONL for research use.

- Conversations: ShareGPT format, one object per line:
  ``{"id": conversation_id, "model": ..., "conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}``.
  The latest reply of each turn is used (regenerations replace earlier replies). A reply withheld
  or flagged by moderation is omitted, the user's text is kept; empty replies are omitted too.
- Battles: FastChat's clean-battle shape, one vote per line, oldest first, first vote per battle:
  ``question_id`` (the battle id), ``model_a``, ``model_b``, ``winner``, ``judge`` (salted client
  hash), ``anony``, ``tstamp``, ``counted``, ``not_counted_reason``, ``conversation_a_id``,
  ``conversation_b_id``, ``conv_metadata`` (both answers' style counts as FastChat writes them: stored
  with the vote, or counted from the stored replies for votes older than that; see data/style.py),
  ``shown`` (how much of each reply of the last round the visitor saw, or null for older votes),
  ``sampling`` (anonymous battles: the pair-sampling weights in force and the drawn pair's probability),
  ``categories`` (the first prompt's labels, data/categories.py: the rules' labels stored with the vote
  and the judge's given after it) with FastChat's ``is_code`` and ``language`` (an ISO 639-1 code here)
  beside them, and ``category_tag`` (the judge's latest classification in FastChat/LMArena's shape,
  ``criteria_v0.1`` / ``math_v0.1`` / ``creative_writing_v0.1`` / ``if_v0.1``; null when no judge labelled it).
  Anonymous battles only, unless ``--include-named``. Uncounted votes are written with ``counted: false``
  (the leaderboard skips them unless asked not to).
- Judge votes (``--judge-votes``): every verdict of the judge on a side-by-side round, oldest first,
  in the shape of FastChat's MT-bench pairwise judgments: ``question_id`` (the battle id),
  ``model_a``, ``model_b``, ``winner`` ("model_a" | "model_b" | "tie" | "no_verdict"),
  ``judge`` ([judge model, prompt name]), ``g1_winner`` / ``g2_winner`` and ``g1_judgment`` /
  ``g2_judgment`` (model A's answer shown first / model B's), ``error``, ``turn`` (rounds judged),
  ``tstamp``, ``client`` (salted hash of the visitor who asked), ``counted`` (the verdict the judge
  leaderboard uses: the latest per battle, with a verdict), ``conversation_a_id``,
  ``conversation_b_id``. Redacted as the conversations are: when either conversation has a reply
  withheld or flagged by moderation, the judgments' text (which may quote it) is left out
  (``null``) and ``judgment_withheld`` is "moderated"; the verdicts stay.

Run::

    python -m vicuna_demo.data.export --log-dir logs --conversations conversations.jsonl \\
        --battles battles.jsonl [--include-named] [--judge-votes judge_votes.jsonl]
    PGPASSWORD=... python -m vicuna_demo.data.export --database postgresql://demo@db/arena --battles -

Either output may be ``-`` for stdout. Exits 1 with one ``error:`` line if the log dir holds no
readable store. The store is opened read-only: exporting never changes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from vicuna_demo.data.backends import database_flag
from vicuna_demo.data.categories import category_tag
from vicuna_demo.data.records import is_moderated
from vicuna_demo.data.storage import Store, store_path
from vicuna_demo.data.style import StyleCounts, conv_metadata


def sharegpt_record(conversation: dict) -> dict:
    """One conversation from ``Store.conversations()`` as a ShareGPT object."""
    messages = []
    if conversation.get("system"):
        messages.append({"from": "system", "value": conversation["system"]})
    for turn in conversation["turns"]:
        messages.append({"from": "human", "value": turn["user"]})
        if turn["reply"] and not turn["moderated"]:
            messages.append({"from": "gpt", "value": turn["reply"]})
    return {"id": conversation["conversation_id"], "model": conversation["model"], "conversations": messages}


def later_labels(label_rows: list[dict]) -> dict[str, dict]:
    """``Store.label_rows()`` -> battle_id -> {"labels": every label given after the vote, "answer": the
    latest judge answer (or None)}."""
    found: dict[str, dict] = {}
    for row in label_rows:
        entry = found.setdefault(row["battle_id"], {"labels": [], "answer": None})
        entry["labels"] += [label for label in row["labels"] if label not in entry["labels"]]
        if row["answer"] is not None and row["labeller"].startswith("judge:"):
            entry["answer"] = row["answer"]
    return found


def battle_record(vote: dict, replies: dict[str, StyleCounts] | None = None, later: dict | None = None) -> dict:
    """One vote from ``Store.vote_rows()`` in FastChat's clean-battle shape. ``conv_metadata``: the style
    counts stored with the vote, else counted from ``replies`` (conversation id -> counts), else None.
    ``later``: this battle's entry of ``later_labels`` (labels given after the vote), if any."""
    categories = vote.get("categories")
    if later and later["labels"]:
        categories = (categories or []) + [label for label in later["labels"] if label not in (categories or [])]
    answer = later["answer"] if later else None
    meta = vote.get("conv_metadata")
    if meta is None and replies is not None:
        meta = conv_metadata(replies.get(vote["conversation_a_id"], StyleCounts()),
                             replies.get(vote["conversation_b_id"], StyleCounts()))
    return {
        "question_id": vote["battle_id"],
        "model_a": vote["model_a"],
        "model_b": vote["model_b"],
        "winner": vote["winner"],
        "judge": vote["client_hash"],
        "anony": vote["anony"],
        "tstamp": vote["tstamp"],
        "counted": vote["counted"],
        "not_counted_reason": vote["not_counted_reason"],
        "conversation_a_id": vote["conversation_a_id"],
        "conversation_b_id": vote["conversation_b_id"],
        "conv_metadata": meta,
        "shown": vote.get("shown"),
        "sampling": vote.get("sampling"),
        "categories": categories,
        "is_code": None if vote.get("categories") is None else "code" in vote["categories"],
        "language": next((c[5:] for c in vote.get("categories") or [] if c.startswith("lang:")), None),
        "category_tag": category_tag(answer),
    }


def judge_vote_records(rows: list[dict], moderated_conversations: set[str]) -> list[dict]:
    """``Store.judge_vote_rows()`` (oldest first) as MT-bench-style pairwise judgments, redacted (module docstring)."""
    latest = {row["battle_id"]: i for i, row in enumerate(rows)}
    records = []
    for i, row in enumerate(rows):
        withheld = bool({row["conversation_a_id"], row["conversation_b_id"]} & moderated_conversations)
        records.append({
            "question_id": row["battle_id"],
            "model_a": row["model_a"],
            "model_b": row["model_b"],
            "winner": row["winner"],
            "judge": [row["judge"], row["prompt"]],
            "g1_winner": row["g1_winner"],
            "g2_winner": row["g2_winner"],
            "g1_judgment": None if withheld else row["g1_judgment"],
            "g2_judgment": None if withheld else row["g2_judgment"],
            "judgment_withheld": "moderated" if withheld else None,
            "error": row["error"],
            "turn": row["n_turns"],
            "tstamp": row["tstamp"],
            "client": row["client_hash"],
            "counted": latest[row["battle_id"]] == i and row["winner"] != "no_verdict",
            "conversation_a_id": row["conversation_a_id"],
            "conversation_b_id": row["conversation_b_id"],
        })
    return records


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records one per line to path ('-' = stdout), atomically for files; return the count."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    if path == "-":
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return len(lines)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vicuna_demo.data.export",
        description="Export logged conversations (ShareGPT JSONL), battles (FastChat clean-battle JSONL) and "
                    "judge votes (MT-bench-style pairwise judgments, JSONL).",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--log-dir", help="the demo's log directory (holds vicuna_demo.sqlite3)")
    where.add_argument("--database", metavar="URI",
                       help="read a PostgreSQL store instead: postgresql://user@host/db (password from PGPASSWORD); "
                            "'env' reads the URI from VICUNA_DEMO_DATABASE")
    parser.add_argument("--conversations", metavar="PATH", help="write ShareGPT conversations here ('-' = stdout)")
    parser.add_argument("--battles", metavar="PATH", help="write battles here ('-' = stdout)")
    parser.add_argument("--include-named", action="store_true",
                        help="also export votes from named (non-anonymous) comparisons")
    parser.add_argument("--judge-votes", metavar="PATH",
                        help="write the judge's verdicts on side-by-side rounds here ('-' = stdout)")
    args = parser.parse_args(argv)
    if not args.conversations and not args.battles and not args.judge_votes:
        parser.error("nothing to do: give --conversations PATH, --battles PATH and/or --judge-votes PATH")

    logging.basicConfig(level=logging.ERROR)  # the store's problems are reported below, once
    database = database_flag(args.database, parser.error)
    if database is None and not store_path(args.log_dir).is_file():
        print(f"error: no store in {args.log_dir!r} (expected {store_path(args.log_dir)})", file=sys.stderr)
        return 1
    with Store(args.log_dir, read_only=True, database=database) as store:
        if not store.ok:
            print(f"error: cannot read the store: {store.problem}", file=sys.stderr)
            return 1
        conversations = store.conversations() if args.conversations else []
        votes = store.vote_rows(anony_only=not args.include_named) if args.battles else []
        older = {c for v in votes if v["conv_metadata"] is None
                 for c in (v["conversation_a_id"], v["conversation_b_id"])}
        replies = store.reply_counts(older) if older else {}
        labelled = later_labels(store.label_rows()) if args.battles else {}
        judged = []
        if args.judge_votes:
            moderated = {t.conversation_id for t in store.turns() if is_moderated(t)}
            judged = judge_vote_records(store.judge_vote_rows(), moderated)
        if not store.ok:
            print(f"error: cannot read the store: {store.problem}", file=sys.stderr)
            return 1
    try:
        if args.conversations:
            n = write_jsonl(args.conversations, (sharegpt_record(c) for c in conversations))
            print(f"wrote {n} conversations to {args.conversations}", file=sys.stderr)
        if args.battles:
            n = write_jsonl(args.battles, (battle_record(v, replies, labelled.get(v["battle_id"])) for v in votes))
            print(f"wrote {n} battles to {args.battles}", file=sys.stderr)
        if args.judge_votes:
            n = write_jsonl(args.judge_votes, judged)
            print(f"wrote {n} judge votes to {args.judge_votes}", file=sys.stderr)
    except OSError as exc:
        print(f"error: cannot write output: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
