"""Run an evaluation: every answer at once (the engines batch them), then every judgment at once.

    runner = EvaluationRunner(engines, judge="GPT-4o", answer_params=SamplingParams(max_new_tokens=1024))
    result = runner.run(questions, "Vicuna-7B", "Other", mode="pairwise", progress=print)
    result = runner.run(questions, "A", "B", "C", pairs=model_pairs(["A", "B", "C"], "baseline", "C"))

Answers: one task per (model, question), all submitted together; a two-turn question's task sends
turn 2 with the model's own first answer in the conversation, as a visitor's chat would. Each
model answers with its template's default system prompt; math, reasoning, coding and extraction
questions are answered greedily (temperature 0), the rest with the given temperature.

Judgments: pairwise mode asks the judge about every turn of every question twice, once with A's
answer first (game 1) and once with B's first (game 2), and a verdict counts only when both games
agree (``verdicts.PairVerdict``). With more than two models every pair is judged (``pairs="all"``,
FastChat's pairwise-all), or each model against one baseline (``pairs="baseline"``, as Arena-Hard and
FastChat's pairwise-baseline: the model is A, the baseline B); each model answers once whatever the
number of its pairs. Single mode grades every answer of each model from 1 to 10. The
judge runs greedily. A turn whose answers are missing (an engine error, moderation) is not judged
and is reported; a judgment that fails or times out is recorded with its error ("no verdict") and
the rest of the run goes on.

Fair share: ``max_in_flight`` bounds the requests this run has in flight at once (the app sets it
below the engines' batch size so visitors' chats keep room); None submits everything at once (the
command line). ``moderate`` (the app's moderator, for question sets visitors upload) checks each
question (its turns and its reference answers, which reach the judge) before any model sees it.
``cancel()`` stops the run: requests in flight are cancelled on their engines at once. Every request goes
through the one path to the engines (``Dispatcher.send``, engines/dispatch.py), the app's own in the page
(the chat's rules), with this run's cancel token and a timeout per request.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..engines.dispatch import DEFAULT_TIMEOUT_S, CancelToken, Dispatcher, UnknownModel
from ..engines.protocol import EngineError, PromptTooLong, SamplingParams
from .prompts import fastchat_prompt, pairwise_prompt, single_prompt
from .questions import Question
from .verdicts import (PairVerdict, combine, parse_pair, parse_pair_fastchat, parse_rating,
                       parse_rating_fastchat)

log = logging.getLogger("vicuna_demo.evaluation")

MODES = ("pairwise", "single", "answers")   # answers: no judge (a CPU, or answers to judge elsewhere)
PAIRINGS = ("all", "baseline")              # every pair of models, or each model against the baseline
GREEDY_CATEGORIES = frozenset({"math", "reasoning", "coding", "extraction"})
# the categories MT-Bench judges with a reference answer (FastChat's gen_judgment.py): only these
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding", "arena-hard-200"})
JUDGE_PARAMS = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=1024)


class Cancelled(Exception):
    """The run was cancelled."""


@dataclass
class Answer:
    """One model's answers to one question (FastChat's model_answer record)."""

    question: Question
    model: str
    params: dict = field(default_factory=dict)
    turns: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    n_tokens: int = 0
    error: str | None = None          # why an answer is missing (engine error, moderation, cancelled)
    tstamp: float = field(default_factory=time.time)
    reused: bool = False              # read from an earlier run's files (--answers, or the same --out)

    @property
    def complete(self) -> bool:
        return self.error is None and len(self.turns) == len(self.question.turns)


@dataclass
class Judgment:
    """The judge on one turn of one question: a pairwise comparison (two games) or one grade."""

    question: Question
    turn: int
    judge: str
    prompt_name: str
    model_a: str                      # pairwise: model A; single: the graded model
    model_b: str | None = None
    g1_prompt: str = ""               # pairwise: game 1 (A first); single: the only prompt
    g1_text: str = ""
    g2_prompt: str = ""               # pairwise: game 2 (B first)
    g2_text: str = ""
    verdict: PairVerdict | None = None
    score: float | None = None        # single
    error: str | None = None          # the judge failed or timed out (in either game)
    tstamp: float = field(default_factory=time.time)
    reused: bool = False              # read from the same --out of an earlier run
    fastchat_rules: bool = False      # asked with FastChat's own prompts: its verdict rules apply

    @property
    def key(self) -> tuple:
        """What identifies this judgment across runs: question, turn, the model(s), the judge."""
        return (self.question.question_id, self.turn, self.model_a, self.model_b, self.judge)

    @property
    def pairwise(self) -> bool:
        return self.model_b is not None

    @property
    def outcome(self) -> str:
        """pairwise: "model_a" | "model_b" | "tie" | "no_verdict"; single: the score or "no_verdict"."""
        if self.pairwise:
            return self.verdict.winner if self.verdict else "no_verdict"
        return "no_verdict" if self.score is None else f"{self.score:g}"


def model_pairs(models: Sequence[str], how: str = "all", baseline: str | None = None) -> list[tuple[str, str]]:
    """The (A, B) pairs to judge: ``"all"``, every pair in the order given (FastChat's pairwise-all); or
    ``"baseline"``, each other model as A against ``baseline`` as B (FastChat's pairwise-baseline,
    Arena-Hard). Raises ValueError for fewer than two models or a baseline not among them."""
    models = list(dict.fromkeys(models))
    if how not in PAIRINGS:
        raise ValueError(f"pairs must be one of {', '.join(PAIRINGS)}")
    if len(models) < 2:
        raise ValueError("pairwise evaluation needs at least two different models")
    if how == "baseline":
        if baseline not in models:
            raise ValueError(f"the baseline {baseline!r} is not one of the models ({', '.join(models)})")
        return [(m, baseline) for m in models if m != baseline]
    return [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]


def baseline_of(pairs: Sequence[tuple[str, str]]) -> str | None:
    """The model every pair is judged against (B of each of several pairs, never an A), or None."""
    firsts, seconds = {a for a, _ in pairs}, {b for _, b in pairs}
    return next(iter(seconds)) if len(pairs) > 1 and len(seconds) == 1 and not firsts & seconds else None


@dataclass
class EvaluationResult:
    mode: str
    models: tuple[str, ...]            # (a, b), (a,) for single mode with one model, or more
    judge: str
    questions: list[Question]
    answers: dict[str, dict] = field(default_factory=dict)      # model -> question_id -> Answer
    judgments: list[Judgment] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)            # turns not judged, and why
    cancelled: bool = False
    answer_s: float = 0.0
    judge_s: float = 0.0
    pairs: tuple[tuple[str, str], ...] = ()                     # pairwise: the (A, B) pairs judged
    baseline: str | None = None                                 # pairwise against a baseline: its name


class EvaluationRunner:
    """See the module docstring. One runner runs one evaluation at a time."""

    def __init__(self, engines: Mapping[str, object], *, judge: str,
                 answer_params: SamplingParams | Mapping[str, SamplingParams] = SamplingParams(),
                 judge_params: SamplingParams = JUDGE_PARAMS, max_in_flight: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, moderate: Callable[[str], object] | None = None,
                 references: Mapping | None = None, judge_prompts: Mapping | None = None,
                 dispatcher: Dispatcher | None = None):
        self.engines = engines
        self.judge = judge
        self.answer_params = answer_params
        self.judge_params = judge_params
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.moderate = moderate
        self.references = references     # question_id -> reference turns (--reference FILE); None: the questions'
        self.judge_prompts = judge_prompts   # FastChat's judge_prompts.jsonl by name (--judge-prompts); None: ours
        # the one path to the engines (the app's, shared with the chat; else one over ``engines`` and ``moderate``)
        self.dispatcher = dispatcher or Dispatcher(engines, moderate=moderate, timeout_s=timeout_s)
        self._cancel = threading.Event()
        self._token = CancelToken()

    # -- control ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the run: every request in flight ends on its engine at once (they all hold this run's token)."""
        self._cancel.set()
        self._token.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- one request --------------------------------------------------------------------------
    def _generate(self, model: str, messages: list[dict], params: SamplingParams, answer: Answer | None = None) -> str:
        """The whole reply text (its token count and finish reason added to ``answer``), through the one path to
        an engine (engines/dispatch.py) with this run's cancel token and timeout; raises EngineError /
        PromptTooLong / Cancelled."""
        if self._cancel.is_set():
            raise Cancelled
        # the question was moderated once, before any model saw it (``_blocked``): nothing here is new text
        reply = self.dispatcher.send(model, messages, params, cancel=self._token, timeout_s=self.timeout_s)
        text = reply.text()
        if self._cancel.is_set():
            raise Cancelled
        if answer is not None:
            answer.n_tokens += reply.stats.n_tokens
            answer.finish_reasons.append(reply.stats.finish_reason or "")
        return text.strip()

    def _attempt(self, model: str, messages: list[dict], params: SamplingParams,
                 answer: Answer | None = None) -> tuple[str, str | None]:
        """(text, error): errors become a message, so one failure never takes the run with it."""
        try:
            return self._generate(model, messages, params, answer), None
        except Cancelled:
            return "", "cancelled"
        except UnknownModel:
            return "", f"no model called {model!r} is loaded"
        except (EngineError, PromptTooLong) as exc:
            return "", str(exc)
        except Exception as exc:  # noqa: BLE001 - a bug in one request must not end the run
            log.exception("evaluation request to %s failed", model)
            return "", f"{type(exc).__name__}: {exc}"

    # -- stages -------------------------------------------------------------------------------
    def params_for(self, question: Question, model: str | None = None) -> SamplingParams:
        """``answer_params`` (the model's own when it is a mapping of model -> SamplingParams), greedy for the
        categories with one right answer."""
        params = self.answer_params
        if isinstance(params, Mapping):
            params = params.get(model) or SamplingParams()
        if question.category.lower() in GREEDY_CATEGORIES:
            return dataclasses.replace(params, temperature=0.0)
        return params

    def _answer(self, model: str, question: Question, blocked: str | None) -> Answer:
        params = self.params_for(question, model)
        answer = Answer(question=question, model=model, params=params.as_dict())
        if blocked:
            answer.error = blocked
            return answer
        engine = self.engines.get(model)
        system = engine.default_system if engine is not None else ""
        messages: list[dict] = [{"role": "system", "content": system}] if system else []
        for turn in question.turns:
            messages.append({"role": "user", "content": turn})
            text, error = self._attempt(model, messages, params, answer)
            if error:
                answer.error = error
                break
            answer.turns.append(text)
            messages.append({"role": "assistant", "content": text})
        return answer

    def _blocked(self, question: Question) -> str | None:
        """Why moderation keeps this question from every model, or None."""
        verdict = self.dispatcher.check((*question.turns, *question.reference))
        if verdict is None or getattr(verdict, "allowed", True):
            return None
        return f"stopped by content moderation ({getattr(verdict, 'status', 'flagged')})"

    def references_for(self, question: Question, turn: int) -> list[str]:
        """The reference answers the judge sees on ``turn``, as MT-Bench: only in REFERENCE_CATEGORIES, from
        the reference file when one is given (else the question's own ``reference``), every turn's so far."""
        if question.category.lower() not in REFERENCE_CATEGORIES:
            return []
        turns = question.reference if self.references is None else self.references.get(question.question_id, ())
        return [t for t in tuple(turns)[:turn] if t]

    def _judge_pair(self, question: Question, turn: int, a: Answer, b: Answer) -> tuple:
        """(Judgment, game 1 prompt with A's answer first, game 2 prompt with B's answer first)."""
        asked = list(question.turns[:turn])
        reference = self.references_for(question, turn)
        if self.judge_prompts:
            game1 = fastchat_prompt(self.judge_prompts, "pair", asked, [a.turns[:turn], b.turns[:turn]], reference)
            game2 = fastchat_prompt(self.judge_prompts, "pair", asked, [b.turns[:turn], a.turns[:turn]], reference)
        else:
            game1 = pairwise_prompt(asked, a.turns[:turn], b.turns[:turn], reference)
            game2 = pairwise_prompt(asked, b.turns[:turn], a.turns[:turn], reference)
        judgment = Judgment(question=question, turn=turn, judge=self.judge, prompt_name=game1.name,
                            model_a=a.model, model_b=b.model, g1_prompt=game1.user, g2_prompt=game2.user,
                            fastchat_rules=bool(self.judge_prompts))
        return judgment, game1, game2

    def run(self, questions: Sequence[Question], *models: str | None, mode: str = "pairwise",
            pairs: Sequence[tuple[str, str]] | None = None, progress: Callable[[str, int, int], None] | None = None,
            reuse_answers: Mapping | None = None, reuse_judgments: Mapping | None = None) -> EvaluationResult:
        """Answer, then judge; ``progress(stage, done, total)`` with stage "answers" or "judgments".

        ``models``: the names (a None is skipped: ``run(q, a, None, mode="single")``). Pairwise judges
        ``pairs`` (``model_pairs``; default every pair of ``models``, i.e. A against B for two).
        ``reuse_answers`` (model -> question_id -> Answer) and ``reuse_judgments`` (Judgment.key -> Judgment)
        come from earlier runs: a complete answer is not asked again, and a judgment without error is
        not asked again when every answer it judged was reused (a new answer gets a new judgment)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        names = tuple(dict.fromkeys(m for m in models if m))
        if not names:
            raise ValueError("no model to evaluate")
        if mode == "pairwise":
            pairs = tuple(pairs) if pairs is not None else tuple(model_pairs(names))
            if not pairs or any(a == b or a not in names or b not in names for a, b in pairs):
                raise ValueError("pairwise evaluation needs pairs of two different models among those evaluated")
        report = progress or (lambda stage, done, total: None)
        result = EvaluationResult(mode=mode, models=names, judge=self.judge, questions=list(questions),
                                  pairs=pairs if mode == "pairwise" else (),
                                  baseline=baseline_of(pairs) if mode == "pairwise" else None)
        started = time.perf_counter()
        result.answers = self.answer(questions, names, progress=report, reuse=reuse_answers)
        result.answer_s = time.perf_counter() - started
        if self._cancel.is_set() or mode == "answers":
            result.cancelled = self._cancel.is_set()
            return result
        started = time.perf_counter()
        judgments, requests = self._plan_judgments(result, reuse_judgments or {})
        workers = self.max_in_flight or max(1, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            futures = [(judgment, slot, pool.submit(self._attempt, self.judge, prompt.messages(), self.judge_params))
                       for judgment, slot, prompt in requests]
            report("judgments", 0, len(futures))
            for done, (judgment, slot, future) in enumerate(futures, start=1):
                text, error = future.result()
                setattr(judgment, f"{slot}_text", text)
                if error:
                    judgment.error = f"{judgment.error}; {error}" if judgment.error else error
                report("judgments", done, len(futures))
        for judgment in judgments:
            if judgment.reused:
                continue
            pair, rating = ((parse_pair_fastchat, parse_rating_fastchat) if judgment.fastchat_rules
                            else (parse_pair, parse_rating))
            if judgment.pairwise:
                failed = judgment.error is not None
                judgment.verdict = combine(None if failed else pair(judgment.g1_text),
                                           None if failed else pair(judgment.g2_text))
            else:
                judgment.score = None if judgment.error else rating(judgment.g1_text)
        result.judgments = judgments
        result.judge_s = time.perf_counter() - started
        result.cancelled = self._cancel.is_set()
        return result

    def answer(self, questions: Sequence[Question], models: Sequence[str],
               progress: Callable[[str, int, int], None] | None = None,
               reuse: Mapping | None = None) -> dict[str, dict]:
        """Every model's answers to every question, all submitted at once: model -> question_id -> Answer.
        Complete answers in ``reuse`` (model -> question_id -> Answer) are kept instead of asked again."""
        report = progress or (lambda stage, done, total: None)
        answers: dict[str, dict] = {model: {} for model in models}
        todo = []
        for q in questions:
            for model in models:
                old = (reuse or {}).get(model, {}).get(q.question_id)
                if old is not None and old.complete:
                    old.reused = True
                    answers[model][q.question_id] = old
                else:
                    todo.append((model, q))
        if not todo:
            return answers
        asked = list({q.question_id: q for _, q in todo}.values())
        workers = self.max_in_flight or max(1, len(todo))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval") as pool:
            blocked = dict(zip([q.question_id for q in asked], pool.map(self._blocked, asked)))
            futures = [(model, q, pool.submit(self._answer, model, q, blocked[q.question_id])) for model, q in todo]
            report("answers", 0, len(futures))
            for done, (model, question, future) in enumerate(futures, start=1):
                answers[model][question.question_id] = future.result()
                report("answers", done, len(futures))
        return answers

    def _plan_judgments(self, result: EvaluationResult, reuse: Mapping) -> tuple[list[Judgment], list[tuple]]:
        """The judgments to make and their requests (judgment, "g1"/"g2", JudgePrompt); judgments in
        ``reuse`` over reused answers are kept as they are, with no request."""

        def reused(key: tuple, answers: Sequence[Answer]) -> Judgment | None:
            old = reuse.get(key)
            if old is None or old.error or not all(x.reused for x in answers):
                return None
            old.reused = True
            return old

        judgments: list[Judgment] = []
        requests: list[tuple] = []
        for question in result.questions:
            for turn in range(1, len(question.turns) + 1):
                for pair in result.pairs:
                    answers = [result.answers[m][question.question_id] for m in pair]
                    missing = [x for x in answers if len(x.turns) < turn]
                    if missing:
                        result.skipped.append(f"question {question.question_id} turn {turn}: {missing[0].model} has "
                                              f"no answer ({missing[0].error or 'missing'})")
                        continue
                    old = reused((question.question_id, turn, *pair, self.judge), answers)
                    if old is not None:
                        judgments.append(old)
                        continue
                    judgment, game1, game2 = self._judge_pair(question, turn, *answers)
                    judgments.append(judgment)
                    requests += [(judgment, "g1", game1), (judgment, "g2", game2)]
                if result.mode == "pairwise":
                    continue
                for answer in (result.answers[m][question.question_id] for m in result.models):
                    if len(answer.turns) < turn:
                        result.skipped.append(f"question {question.question_id} turn {turn}: {answer.model} has "
                                              f"no answer ({answer.error or 'missing'})")
                        continue
                    old = reused((question.question_id, turn, answer.model, None, self.judge), [answer])
                    if old is not None:
                        judgments.append(old)
                        continue
                    asked, reference = list(question.turns[:turn]), self.references_for(question, turn)
                    prompt = (fastchat_prompt(self.judge_prompts, "single", asked, [answer.turns[:turn]], reference)
                              if self.judge_prompts else single_prompt(asked, answer.turns[:turn], reference))
                    judgment = Judgment(question=question, turn=turn, judge=self.judge, prompt_name=prompt.name,
                                        model_a=answer.model, g1_prompt=prompt.user,
                                        fastchat_rules=bool(self.judge_prompts))
                    judgments.append(judgment)
                    requests.append((judgment, "g1", prompt))
        return judgments, requests
