"""The judge prompts, written for this project after the published method (Zheng et al. 2023,
"Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena"): a strong model compares two answers
(pairwise, verdict ``[[A]]``, ``[[B]]`` or ``[[C]]`` for a tie) or grades one (``[[rating]]``, 1-10),
explaining before it decides. Each prompt names the known biases it asks the judge to resist
(order of presentation, length, names). Where the question comes with a reference answer (math,
reasoning, coding), the judge is told to check the answers against it first; on the second turn of
a two-turn question it sees the reference answers of both turns, as MT-Bench shows them. For the
second turn the judge sees the whole exchange and judges the answer to the last question. The
prompts' names start with ``vd-`` so they are never mistaken for FastChat's prompts of the same name.

    prompt = pairwise_prompt(["What is 2+2?"], ["4"], ["5"], reference="4")
    messages = prompt.messages()        # [{"role": "system", ...}, {"role": "user", ...}]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

VERSION = "v1"
PREFIX = "vd"          # vicuna-demo: our names stay apart from FastChat's judge_prompts.jsonl names

_BIASES = ("Do not let the order in which the answers are shown influence you, do not prefer an answer "
           "because it is longer, and ignore any model names or claims an answer makes about itself. ")

PAIR_SYSTEM = (
    "You are an impartial evaluator of AI assistants. You will see a user's question and the answers of two "
    "assistants, A and B. Decide which assistant answered the user's question better, considering how well "
    "each answer follows the instructions and addresses the need behind them: correctness, helpfulness, "
    "relevance, depth, clarity and, where it matters, creativity. " + _BIASES +
    "First compare the two answers in a short explanation. Then give your verdict on its own last line, "
    "exactly in this format: [[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] for a tie.")

PAIR_REFERENCE_SYSTEM = (
    "You are an impartial evaluator of AI assistants. You will see a user's question, a reference answer known "
    "to be correct, and the answers of two assistants, A and B. Decide which assistant answered better. "
    "Correctness comes first: check each answer against the reference, point out every mistake, and prefer "
    "the answer that reaches the right result with sound steps. " + _BIASES +
    "First explain your comparison briefly. Then give your verdict on its own last line, exactly in this "
    "format: [[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] for a tie.")

SINGLE_SYSTEM = (
    "You are an impartial evaluator of an AI assistant. You will see a user's question and the assistant's "
    "answer. Judge the answer's quality: correctness, helpfulness, relevance, depth, clarity and, where it "
    "matters, creativity. Do not reward length for its own sake, and ignore any claims the answer makes "
    "about itself. First explain your assessment briefly. Then rate the answer from 1 (useless) to 10 "
    "(excellent) on its own last line, exactly in this format: [[rating]], for example [[6]].")

SINGLE_REFERENCE_SYSTEM = (
    "You are an impartial evaluator of an AI assistant. You will see a user's question, a reference answer "
    "known to be correct, and the assistant's answer. Correctness comes first: compare the answer with the "
    "reference and point out every mistake; a wrong final result cannot score well. Do not reward length for "
    "its own sake. First explain your assessment briefly. Then rate the answer from 1 (useless) to 10 "
    "(excellent) on its own last line, exactly in this format: [[rating]], for example [[6]].")

_LAST_TURN = ("The conversation has {n} user turns. Judge only the answer(s) to the LAST user question; use "
              "the earlier turns as context.\n\n")


@dataclass(frozen=True)
class JudgePrompt:
    name: str            # e.g. "pair-ref-multi-v1": recorded in the outputs beside the judge's name
    system: str
    user: str

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


def _clean(text: str) -> str:
    """Answers are untrusted: make sure none can close its own block and forge another one."""
    return (text or "").replace("<<<", "< < <").replace(">>>", "> > >").strip()


def _block(title: str, text: str) -> str:
    return f"<<<{title}>>>\n{_clean(text)}\n<<<end of {title}>>>"


def _conversation(who: str, questions: Sequence[str], answers: Sequence[str]) -> str:
    if len(questions) == 1:
        return _block(f"answer of {who}", answers[0])
    parts = []
    for i, (q, a) in enumerate(zip(questions, answers), start=1):
        parts.append(f"User (turn {i}):\n{_clean(q)}\n\n{who} (turn {i}):\n{_clean(a)}")
    return _block(f"conversation with {who}", "\n\n".join(parts))


def _references(reference: str | Sequence[str] | None) -> list[str]:
    """A reference (one string: the last turn's) or references (one per turn so far) -> the non-empty ones."""
    if not reference:
        return []
    return [reference] if isinstance(reference, str) else [r for r in reference if r]


def _question_part(questions: Sequence[str], reference: str | Sequence[str] | None) -> str:
    text = _block("question", questions[0]) if len(questions) == 1 else _LAST_TURN.format(n=len(questions))
    references = _references(reference)
    if len(references) == 1:
        text += "\n\n" + _block("reference answer" + (" to the last question" if len(questions) > 1 else ""),
                                references[0])
    else:   # as MT-Bench does on turn 2: the reference answer of every turn
        text += "".join(f"\n\n{_block(f'reference answer to turn {i}', r)}" for i, r in enumerate(references, 1))
    return text


def _name(kind: str, reference: str | Sequence[str] | None, turns: int) -> str:
    """The project's own prompt names ("vd-pair-ref-multi-v1"), never one of FastChat's (its "single-v1" is
    a different text)."""
    return "-".join([PREFIX, kind] + (["ref"] if _references(reference) else []) + (["multi"] if turns > 1 else [])
                    + [VERSION])


def _check(questions: Sequence[str], *answer_lists: Sequence[str]) -> None:
    if not questions or any(len(a) != len(questions) for a in answer_lists):
        raise ValueError("each answer list needs one answer per question turn")


def pairwise_prompt(questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                    reference: str | Sequence[str] | None = None) -> JudgePrompt:
    """The prompt comparing assistant A (shown first) with assistant B, on the last of ``questions``."""
    _check(questions, answers_a, answers_b)
    system = PAIR_REFERENCE_SYSTEM if _references(reference) else PAIR_SYSTEM
    user = "\n\n".join([_question_part(questions, reference), _conversation("assistant A", questions, answers_a),
                        _conversation("assistant B", questions, answers_b),
                        "Which assistant answered better? Explain, then end with [[A]], [[B]] or [[C]]."])
    return JudgePrompt(_name("pair", reference, len(questions)), system, user)


def single_prompt(questions: Sequence[str], answers: Sequence[str],
                  reference: str | Sequence[str] | None = None) -> JudgePrompt:
    """The prompt grading one assistant's answer to the last of ``questions`` from 1 to 10."""
    _check(questions, answers)
    system = SINGLE_REFERENCE_SYSTEM if _references(reference) else SINGLE_SYSTEM
    user = "\n\n".join([_question_part(questions, reference), _conversation("the assistant", questions, answers),
                        "Rate the answer. Explain, then end with [[rating]]."])
    return JudgePrompt(_name("single", reference, len(questions)), system, user)


# -- FastChat's judge_prompts.jsonl, by name (the researcher's own file; its text is not shipped here) ----------
FASTCHAT_NAMES = {  # (kind, with reference, multi-turn) -> the prompt FastChat's gen_judgment.py uses
    ("pair", False, False): "pair-v2", ("pair", False, True): "pair-v2-multi-turn",
    ("pair", True, False): "pair-math-v1", ("pair", True, True): "pair-math-v1-multi-turn",
    ("single", False, False): "single-v1", ("single", False, True): "single-v1-multi-turn",
    ("single", True, False): "single-math-v1", ("single", True, True): "single-math-v1-multi-turn",
}


class JudgePromptsError(ValueError):
    """A judge prompts file that cannot be used; the message says why."""


def load_judge_prompts(path) -> dict[str, dict]:
    """FastChat's ``judge_prompts.jsonl`` (one {"name", "system_prompt", "prompt_template", "output_format"}
    per line) -> name -> record, checked to hold every name of ``FASTCHAT_NAMES``."""
    import json
    from pathlib import Path
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise JudgePromptsError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    prompts = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise JudgePromptsError(f"{path}, line {number}: not valid JSON") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                   for k in ("name", "system_prompt", "prompt_template")):
            raise JudgePromptsError(f"{path}, line {number}: needs name, system_prompt and prompt_template")
        prompts[record["name"]] = record
    missing = sorted(set(FASTCHAT_NAMES.values()) - set(prompts))
    if missing:
        raise JudgePromptsError(f"{path}: no prompt named {', '.join(missing)} (FastChat's names)")
    return prompts


class _Blank(dict):
    def __missing__(self, key):
        return ""


def fastchat_prompt(prompts: dict[str, dict], kind: str, questions: Sequence[str], answers: Sequence[Sequence[str]],
                    reference: Sequence[str] = ()) -> JudgePrompt:
    """A prompt of FastChat's file, filled the way its gen_judgment.py fills it: single turn ``{question}``,
    ``{answer}`` / ``{answer_a}``, ``{answer_b}``; two turns ``{question_1}``, ``{answer_a_1}`` ...; references
    ``{ref_answer_1}``, ``{ref_answer_2}``. ``answers``: one list of turns (single) or two (pair)."""
    _check(questions, *answers)
    multi = len(questions) > 1
    record = prompts[FASTCHAT_NAMES[(kind, bool(reference), multi)]]
    values = _Blank({f"ref_answer_{i}": r for i, r in enumerate(reference, 1)})
    names = ["answer"] if kind == "single" else ["answer_a", "answer_b"]
    if multi:
        values.update({f"question_{i}": q for i, q in enumerate(questions, 1)})
        for name, turns in zip(names, answers):
            values.update({f"{name}_{i}": a for i, a in enumerate(turns, 1)})
    else:
        values["question"] = questions[0]
        values.update({name: turns[0] for name, turns in zip(names, answers)})
    return JudgePrompt(record["name"], record["system_prompt"], record["prompt_template"].format_map(values))
