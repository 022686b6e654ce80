"""Question sets in FastChat's format (JSONL, one question per line), loaded and checked.

    {"question_id": 81, "category": "writing", "turns": ["first user turn", "optional second turn"],
     "reference": ["optional reference answer to turn 1", "... to turn 2"]}

The Vicuna-80 and MT-Bench ``question.jsonl`` files load unchanged. ``turns`` holds one or two user
turns; ``reference`` (a list, one entry per turn, or a single string for turn 1) is what a math or
reasoning judge prompt compares the answers with. A line with ``text`` instead of ``turns`` (the
original Vicuna file) is read as a one-turn question. Every problem is reported with its line
number (``QuestionFileError``, every bad line at once), never skipped silently.

``check_upload(filename, data)`` is the gate for a file a visitor uploads (name, size, UTF-8, schema),
run by the serving layer before gradio stores the file. ``builtin_questions()`` is the set shipped
beside this file (``questions.jsonl``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PATH = Path(__file__).with_name("questions.jsonl")
MAX_TURNS = 2
MAX_REPORTED = 20                     # bad lines listed in one error
# what a visitor may upload (the 📋 Evaluate tab): the one kind of file the app accepts
UPLOAD_SUFFIXES = (".jsonl", ".json", ".txt")
MAX_UPLOAD_BYTES = 2 * 1024 * 1024    # MT-Bench's 80 questions are 30 kB
MAX_UPLOAD_QUESTIONS = 200


class QuestionFileError(ValueError):
    """A question file cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()      # reference answers, one per turn (may be shorter than turns)

    def reference_for(self, turn: int) -> str | None:
        """The reference answer for turn ``turn`` (1-based), or None."""
        return self.reference[turn - 1] if len(self.reference) >= turn and self.reference[turn - 1] else None

    def as_dict(self) -> dict:
        out = {"question_id": self.question_id, "category": self.category, "turns": list(self.turns)}
        if self.reference:
            out["reference"] = list(self.reference)
        return out


def _strings(value, what: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QuestionFileError(f"{where}: {what} must be a list of strings.")
    return tuple(value)


def parse_question(obj, where: str) -> Question:
    """One decoded JSON line -> Question; raises QuestionFileError naming ``where``."""
    if not isinstance(obj, dict):
        raise QuestionFileError(f"{where}: expected a JSON object like "
                                '{"question_id": 1, "category": "writing", "turns": ["..."]}.')
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
        raise QuestionFileError(f"{where}: question_id must be a number or a non-empty string.")
    if "turns" in obj:
        turns = _strings(obj["turns"], "turns", where)
    elif isinstance(obj.get("text"), str):
        turns = (obj["text"],)
    else:
        raise QuestionFileError(f"{where}: question {qid!r} has no turns (a list of 1 or 2 user turns).")
    if not 1 <= len(turns) <= MAX_TURNS:
        raise QuestionFileError(f"{where}: question {qid!r} has {len(turns)} turns; 1 or {MAX_TURNS} are supported.")
    if any(not t.strip() for t in turns):
        raise QuestionFileError(f"{where}: question {qid!r} has an empty turn.")
    category = obj.get("category", "general")
    if not isinstance(category, str) or not category.strip():
        raise QuestionFileError(f"{where}: question {qid!r}: category must be a non-empty string.")
    reference = _strings(obj["reference"], "reference", where) if obj.get("reference") is not None else ()
    return Question(question_id=qid, category=category.strip(), turns=turns, reference=reference)


def parse_questions(text: str, *, source: str = "questions", max_questions: int | None = None,
                    max_chars: int | None = None) -> list[Question]:
    """JSONL text -> questions. Blank lines are skipped; ids must be unique. ``max_questions`` and
    ``max_chars`` (per turn) bound files that visitors upload. Every bad line is reported (up to
    ``MAX_REPORTED`` of them, one per line of the error's message), not only the first."""
    questions: list[Question] = []
    seen: dict = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            question = _parse_line(line, where)
            if question.question_id in seen:
                raise QuestionFileError(f"{where}: question_id {question.question_id!r} is already used on line "
                                        f"{seen[question.question_id]}.")
            if max_chars is not None and any(len(t) > max_chars for t in (*question.turns, *question.reference)):
                raise QuestionFileError(f"{where}: a turn or reference of question {question.question_id!r} is "
                                        f"longer than {max_chars:,} characters.")
        except QuestionFileError as exc:
            problems.append(str(exc))
            if len(problems) >= MAX_REPORTED:
                problems.append(f"{source}: stopped reading after {MAX_REPORTED} bad lines.")
                break
            continue
        seen[question.question_id] = number
        questions.append(question)
        if max_questions is not None and len(questions) > max_questions:
            problems.append(f"{source}: more than {max_questions} questions; split the file.")
            break
    if problems:
        raise QuestionFileError("\n".join(problems))
    if not questions:
        raise QuestionFileError(f"{source}: no questions (one JSON object per line).")
    return questions


def _parse_line(line: str, where: str) -> Question:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise QuestionFileError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)}).") from None
    return parse_question(obj, where)


def check_upload(filename: str, data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES,
                 max_questions: int = MAX_UPLOAD_QUESTIONS, max_chars: int | None = None) -> list[Question]:
    """A question file a visitor uploads, checked before the app keeps it: its name (``UPLOAD_SUFFIXES``),
    its size, UTF-8 text, and every line's schema. Raises QuestionFileError naming each problem."""
    name = Path(filename or "").name or "the file"
    if Path(name).suffix.lower() not in UPLOAD_SUFFIXES:
        raise QuestionFileError(f"{name}: only question files are accepted here ({', '.join(UPLOAD_SUFFIXES)}: "
                                "FastChat's JSONL question format).")
    if len(data) > max_bytes:
        raise QuestionFileError(f"{name}: {len(data):,} bytes; question files may have up to {max_bytes:,}.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise QuestionFileError(f"{name}: not a UTF-8 text file.") from None
    return parse_questions(text, source=name, max_questions=max_questions, max_chars=max_chars)


def load_questions(path: str | Path, **limits) -> list[Question]:
    """Read a question file; raises QuestionFileError (also for a missing or unreadable file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuestionFileError(f"{path}: not a UTF-8 text file.") from None
    except OSError as exc:
        raise QuestionFileError(f"{path}: cannot read it ({exc.strerror or exc}).") from None
    return parse_questions(text, source=str(path), **limits)


def builtin_questions() -> list[Question]:
    """The question set written for this project and shipped with the package."""
    return load_questions(BUILTIN_PATH)
