"""The judge in the app: verdicts on side-by-side rounds, and question-set evaluations from the page.

A judge is any engine the app has (a ``--model`` or an ``--endpoint``), named by ``--judge NAME``.
Without one, ``available`` is False and ``unavailable_reason()`` says so.

- ``judge_round(...)`` asks for a pairwise verdict on a finished side-by-side round, in both answer
  orders at once (two requests the judge's engine batches), streams both explanations, and stores
  the outcome as a judge vote (``Store.log_judge_vote``: its own table, never mixed with human
  votes). The verdict counts only when both orders agree; otherwise it is a tie, and the
  explanation says so. A judge that fails or gives no verdict is stored as "no_verdict".
- ``evaluate(...)`` runs ``evaluation.runner`` for a visitor: one evaluation at a time per app
  (``EvaluationBusy`` otherwise), at most ``max_in_flight`` requests at once so visitors' chats keep
  their share of each engine's batch, every question checked by the app's moderator first (an
  operator's file on the command line is trusted instead; see ``vicuna_demo.evaluate``). It
  yields progress events and ends with the result, the summary, and a zip of the output files
  (after ``stop_evaluation``, of what was done). Closing the iterator (the visitor left) cancels the run.
  Mode "answers" (generate the answers only) needs no judge: the one mode an app without one offers.
- ``estimate(...)`` says before a run how long its answers will take, from the speeds measured in this
  app (``speed.SpeedBook``: visitors' replies, earlier evaluations) and the batch the run uses;
  ``answer_tokens(models)`` is the reply length its answers default to (shorter for a model on a CPU).

The judge and evaluations send their requests through the chat service's ``Dispatcher`` (engines/dispatch.py),
so they follow the chat's rules for moderation, sampling and cancelling; each request has ``timeout_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from ..data.shared import SharedSlot
from ..data.storage import JudgeVoteRecord
from ..engines.dispatch import DEFAULT_TIMEOUT_S, CancelToken, Dispatcher
from ..engines.protocol import EngineError, PromptTooLong, SamplingParams
from ..evaluation.outputs import category_table, plot_summary, summarize, write_outputs
from ..evaluation.prompts import pairwise_prompt
from ..evaluation.questions import (MAX_UPLOAD_QUESTIONS, Question, QuestionFileError, builtin_questions,
                                   check_upload)
from ..evaluation.runner import JUDGE_PARAMS, MODES, EvaluationResult, EvaluationRunner
from ..evaluation.verdicts import PairVerdict, combine, explain, parse_pair
from .chat import rate_limiter_for
from .speed import SpeedBook

log = logging.getLogger("vicuna_demo.services.judge")

# for visitors and API callers; how to add a judge is in the start-up log (runtime.operator_hints) and the docs
NO_JUDGE = "No judge model is set up on this demo, so answers cannot be judged here."
JUDGE_RATE_PER_MIN = 10          # judge requests a visitor may start per minute (each asks twice)
GAMES = ("g1", "g2")             # g1: model A's answer first; g2: model B's answer first
EVALUATION_TOKENS = 512          # an evaluation's answer length, unless a model's own default is shorter (a CPU)


class EvaluationBusy(RuntimeError):
    """Another evaluation is running in this app."""


@dataclass
class JudgeUpdate:
    """What the page shows while the judge works; the last one has ``done=True``."""

    texts: dict = field(default_factory=lambda: {g: "" for g in GAMES})
    done: bool = False
    verdict: PairVerdict | None = None
    explanation: str = ""            # the verdict in words, or why there is none
    error: str = ""                  # a problem that stopped the judge (shown instead of a verdict)


@dataclass
class EvaluationEvent:
    """Progress of an evaluation: ``stage`` is "answers", "judgments" or "done" (then ``result`` etc. are set)."""

    stage: str
    done: int = 0
    total: int = 0
    result: EvaluationResult | None = None
    summary: dict | None = None
    archive: Path | None = None

    def table(self) -> tuple[list[str], list[list]]:
        """(headers, rows) of the per-category results (once done)."""
        return category_table(self.summary or {})

    def figure(self):
        """The results as a matplotlib figure (once done)."""
        return plot_summary(self.summary or {})

    def done_line(self) -> str:
        """What the run did, once done: "12 of 64 answers, 0 of 80 judgments" (a stopped run's results are
        these)."""
        result = self.result
        if result is None:
            return ""
        answers = [x for by_question in result.answers.values() for x in by_question.values()]
        total = len(result.questions) * len(result.models)
        line = f"{sum(1 for x in answers if x.complete)} of {total} answers"
        if result.mode != "answers":
            judged = sum(1 for j in result.judgments if not j.error)
            line += f", {judged} of {len(result.judgments)} judgments" if result.judgments else ", no judgments"
        return line


@dataclass(frozen=True)
class Estimate:
    """How long an evaluation's answers will take (``JudgeService.estimate``), before it starts.

    ``seconds``: the likely time, the models answering side by side, each at its measured speed with the
    run's batch (a speed measured at that batch by an earlier evaluation; else one reply's speed times the
    answers at once, as a GPU's batch nearly gives). ``most_s``: if running the answers together gains
    nothing (a CPU's cores one stream already fills) and the models take turns. Both assume every answer runs
    to the token limit. None when a model has no measured speed yet. ``text`` says it, and on what it rests."""

    seconds: float | None
    most_s: float | None
    text: str


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _duration(seconds: float) -> str:
    """'under a minute', '7 minutes', '2.5 hours'."""
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60)
    if minutes < 90:
        return _count(minutes, "minute")
    return f"{seconds / 3600:.1f} hours"


def _span(low: float, high: float) -> str:
    """'About 3 minutes', 'Under a minute', 'About 3 to 9 minutes', 'From under a minute to 2 minutes'."""
    a, b = _duration(low), _duration(high)
    if a == b:
        text = a if a.startswith("under") else f"about {a}"
    elif a.split()[-1].startswith("minute") and b.split()[-1].startswith("minute") and not a.startswith("under"):
        text = f"about {a.split()[0]} to {b}"
    else:
        text = f"from {a} to {b}"
    return text[0].upper() + text[1:]


class JudgeService:
    """Shared by all visitors (thread-safe)."""

    def __init__(self, engines: Mapping[str, object], store, *, judge: str | None, moderator=None,
                 max_in_flight: int = 4, params: SamplingParams = JUDGE_PARAMS,
                 answer_params: SamplingParams = SamplingParams(), max_questions: int = MAX_UPLOAD_QUESTIONS,
                 max_input_chars: int = 12000, timeout_s: float = DEFAULT_TIMEOUT_S,
                 answer_defaults: Callable[[str], SamplingParams] | None = None, speeds: SpeedBook | None = None,
                 dispatcher: Dispatcher | None = None):
        if judge and judge not in engines:
            raise KeyError(f"--judge {judge!r}: no such model")
        self.engines = engines
        self.store = store
        self.judge = judge or None
        self.moderator = moderator
        self.max_in_flight = max(1, max_in_flight)
        self.params = params
        self.answer_params = answer_params
        # model -> its recommended sampling with the flags over it (ChatService.defaults_for): what answers use
        self.answer_defaults = answer_defaults
        self.max_questions = max_questions
        self.max_input_chars = max_input_chars
        self.timeout_s = timeout_s
        # the one path from text to an engine: the chat service's in the app (``from_settings``), so the judge and
        # evaluations follow the chat's rules (moderation, sampling, cancel); each request here has ``timeout_s``
        self.dispatcher = dispatcher or Dispatcher(engines, moderate=moderator.check if moderator is not None
                                                   else None, timeout_s=timeout_s)
        self.rate_limiter = rate_limiter_for(store, "judge", JUDGE_RATE_PER_MIN)
        self.speeds = speeds if speeds is not None else SpeedBook()   # the app's: ChatService.speeds
        # one evaluation at a time: in this process, or across the replicas sharing the store
        self._evaluation = SharedSlot(store, "evaluation") if getattr(store, "shared", False) else threading.Lock()
        self._running: tuple[str | None, EvaluationRunner] | None = None   # (owner, runner) of the evaluation

    @classmethod
    def from_settings(cls, service, settings) -> "JudgeService":
        """The app's judge over a ChatService's engines, store and moderator (``settings.judge``); page
        evaluations keep at most half of an engine's batch (--max-batch-requests, else 64 on a GPU, 8 on a CPU)."""
        from ..loading import cuda_available
        batch = settings.max_batch_requests or (64 if cuda_available() else 8)
        judge = cls.for_app(service.engines, service.store, service.moderator, settings, batch_size=batch)
        judge.answer_defaults = service.defaults_for     # each model answers with its own recommended sampling
        judge.speeds = service.speeds                    # the speeds visitors' replies measured, for estimates
        judge.dispatcher = service.dispatcher            # one path (and one moderation rule) for every route
        return judge

    @classmethod
    def for_app(cls, engines: Mapping[str, object], store, moderator, settings, *, batch_size: int) -> "JudgeService":
        """The app's judge: ``settings.judge``; evaluations use at most half of an engine's batch."""
        params = dataclasses.replace(JUDGE_PARAMS, max_new_tokens=min(JUDGE_PARAMS.max_new_tokens,
                                                                      settings.max_new_tokens_limit))
        answers = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                 max_new_tokens=settings.max_new_tokens)
        return cls(engines, store, judge=settings.judge, moderator=moderator, max_in_flight=max(1, batch_size // 2),
                   params=params, answer_params=answers, max_input_chars=settings.max_input_chars)

    # -- availability -------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.judge is not None

    def unavailable_reason(self) -> str:
        return "" if self.available else NO_JUDGE

    def modes(self) -> tuple[str, ...]:
        """The evaluation modes this app offers: all of them with a judge, only "answers" without one."""
        return MODES if self.available else ("answers",)

    def self_judging_note(self, *models: str) -> str:
        """A warning when the judge is one of the contestants (self-preference bias), else ''."""
        if self.judge in models:
            return (f"Note: the judge {self.judge} is also one of the contestants; judges tend to favour their own "
                    "answers (self-preference bias).")
        return ""

    # -- question sets ----------------------------------------------------------------------------
    @staticmethod
    def builtin_size() -> int:
        """How many questions the built-in set has."""
        return len(builtin_questions())

    def question_set(self, path: str | None) -> list[Question]:
        """The questions of a FastChat JSONL file a visitor gave (held to the upload rules of
        ``check_upload``, as the serving layer held the upload itself), else the built-in set.
        Raises QuestionFileError with a message for the visitor."""
        if not path:
            return builtin_questions()
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise QuestionFileError(f"{Path(path).name}: cannot read it ({exc.strerror or exc}).") from None
        return check_upload(Path(path).name, data, max_questions=self.max_questions, max_chars=self.max_input_chars)

    # -- a side-by-side round ---------------------------------------------------------------------
    def _stream_game(self, game: str, messages: list[dict], inbox: queue.Queue, cancel: CancelToken) -> None:
        try:
            # the round's text was moderated when the visitor sent it: nothing in the prompt is new to a model
            reply = self.dispatcher.send(self.judge, messages, self.params, cancel=cancel, timeout_s=self.timeout_s)
            for delta in reply:
                inbox.put((game, "delta", delta))
        except PromptTooLong:
            inbox.put((game, "error", f"The round is too long for the judge {self.judge}'s context window."))
        except EngineError as exc:
            inbox.put((game, "error", f"The judge {self.judge} failed: {exc}"))
        except Exception as exc:  # noqa: BLE001 - one game's bug must not hang the other
            log.exception("judge game %s crashed", game)
            inbox.put((game, "error", f"The judge failed ({type(exc).__name__})."))
        finally:
            inbox.put((game, "end", None))

    def judge_round(self, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str], *,
                    model_a: str, model_b: str, battle_id: str, conversation_a_id: str, conversation_b_id: str,
                    client_hash: str) -> Iterator[JudgeUpdate]:
        """Stream the judge's two games on a round and store the verdict. Yields JudgeUpdate."""
        update = JudgeUpdate()
        if not self.available:
            update.done, update.error = True, NO_JUDGE
            yield update
            return
        if not questions or len(answers_a) != len(questions) or len(answers_b) != len(questions) \
                or not all(a.strip() for a in (*answers_a, *answers_b)):
            update.done, update.error = True, "There is no finished round to judge yet: both models must answer first."
            yield update
            return
        wait = self.rate_limiter.allow(client_hash)
        if wait > 0:
            update.done, update.error = True, (f"The judge can be asked {JUDGE_RATE_PER_MIN} times a minute; please "
                                               f"wait {wait:.0f} s.")
            yield update
            return
        games = {"g1": pairwise_prompt(questions, answers_a, answers_b),
                 "g2": pairwise_prompt(questions, answers_b, answers_a)}
        inbox: queue.Queue = queue.Queue()
        cancel = CancelToken()            # the visitor left: both games end on the judge's engine at once
        errors: dict[str, str] = {}
        for game, prompt in games.items():
            threading.Thread(target=self._stream_game, args=(game, prompt.messages(), inbox, cancel),
                             name=f"judge-{game}", daemon=True).start()
        pending = set(GAMES)
        try:
            while pending:
                items = [inbox.get()]
                while not inbox.empty():
                    items.append(inbox.get_nowait())
                for game, kind, value in items:
                    if kind == "delta":
                        update.texts[game] += value
                    elif kind == "error":
                        errors[game] = value
                    else:
                        pending.discard(game)
                if pending:
                    yield dataclasses.replace(update, texts=dict(update.texts))
        finally:
            if pending:  # the visitor went away: stop both games
                cancel.cancel()
        error = next(iter(errors.values()), "")
        update.verdict = combine(None if "g1" in errors else parse_pair(update.texts["g1"]),
                                 None if "g2" in errors else parse_pair(update.texts["g2"]))
        update.explanation = explain(update.verdict, f"Model A ({model_a})", f"Model B ({model_b})")
        update.error, update.done = error, True
        record = JudgeVoteRecord(
            battle_id=battle_id, tstamp=time.time(), client_hash=client_hash, judge=self.judge,
            prompt=games["g1"].name, model_a=model_a, model_b=model_b, winner=update.verdict.winner,
            g1_winner=update.verdict.g1, g2_winner=update.verdict.g2, g1_judgment=update.texts["g1"],
            g2_judgment=update.texts["g2"], error=error or None, n_turns=len(questions),
            conversation_a_id=conversation_a_id, conversation_b_id=conversation_b_id)
        try:
            self.store.log_judge_vote(record)
        except Exception:  # noqa: BLE001 - a storage bug must not take the verdict with it
            log.exception("could not store the judge verdict of battle %s", battle_id)
        yield update

    def judge_battle(self, battle, client_hash: str) -> Iterator[JudgeUpdate]:
        """``judge_round`` on a side-by-side ``Battle`` (services/battle.py): every exchange both models
        answered, judged on the last one. Refused (one update with ``error``) while a round streams, before
        any round, or when the last round has no complete reply on both sides (moderation, an error)."""
        a, b = battle.a.exchanges, battle.b.exchanges
        if battle.busy or any(not e.done for e in (*a, *b)):
            return iter([JudgeUpdate(done=True, error="Please wait until both replies have finished.")])
        pairs = [(x, y) for x, y in zip(a, b) if x.in_context and y.in_context]
        if not a or not pairs or pairs[-1][0] is not a[-1]:
            return iter([JudgeUpdate(done=True, error="There is no finished round to judge: both models must "
                                                        "answer the last message first.")])
        return self.judge_round([x.user for x, _ in pairs], [x.reply for x, _ in pairs], [y.reply for _, y in pairs],
                                model_a=battle.a.model, model_b=battle.b.model, battle_id=battle.battle_id,
                                conversation_a_id=battle.a.conversation_id,
                                conversation_b_id=battle.b.conversation_id, client_hash=client_hash)

    # -- evaluations from the page -----------------------------------------------------------------
    def streams(self, models: int, questions: int) -> int:
        """How many answers an evaluation of ``models`` models on ``questions`` questions generates at once, per
        model: its ``max_in_flight`` requests (half an engine's batch) shared among the models."""
        at_once = min(self.max_in_flight, max(1, models * questions))
        return max(1, at_once // max(1, models))

    def answer_tokens(self, models: Sequence[str | None]) -> int:
        """The reply length an evaluation's answers start from: EVALUATION_TOKENS, or a model's own default when
        shorter (CPU_MAX_NEW_TOKENS for a model on a CPU, engines/sampling_defaults.py)."""
        own = [self.answer_defaults(m) if self.answer_defaults is not None else self.answer_params
               for m in models if m in self.engines]
        return max(1, min([EVALUATION_TOKENS, *(p.max_new_tokens for p in own)]))

    def estimate(self, questions: Sequence[Question], a: str, b: str | None, *, mode: str = "pairwise",
                 max_new_tokens: int = EVALUATION_TOKENS) -> "Estimate":
        """How long the answers of this evaluation take, from measured speeds: questions x turns x
        max_new_tokens per model over its tok/s (see ``Estimate``)."""
        models = list(dict.fromkeys(m for m in (a, b) if m))
        unknown = [m for m in models if m not in self.engines]
        if unknown or not models:
            return Estimate(None, None, f"Unknown model {unknown[0]!r}." if unknown else "Pick a model.")
        turns = sum(len(q.turns) for q in questions)
        tokens = turns * int(max_new_tokens)
        streams = self.streams(len(models), len(questions))
        fastest, slowest, basis, missing = [], [], [], []
        measured_together = True      # every figure from an earlier evaluation: the models were side by side then
        for model in models:
            batch, reply = self.speeds.batch_speed(model, streams), self.speeds.reply_speed(model)
            shared = self.speeds.stream_speed(model) if batch is None and reply is None else None
            if batch is not None:     # measured at this very batch: the figure to expect
                fastest.append(tokens / batch.tok_s)
                slowest.append(tokens / batch.tok_s)
                basis.append(f"{model}: {batch.tok_s:.1f} tok/s with {streams} answer(s) at once, measured in "
                             f"{_count(batch.samples, 'earlier evaluation')} here")
            elif reply is not None:   # one stream's speed: the batch may multiply it by up to ``streams``, or not
                measured_together = False
                fastest.append(tokens / (reply.tok_s * streams))
                slowest.append(tokens / reply.tok_s)
                basis.append(f"{model}: {reply.tok_s:.1f} tok/s per reply (" + ("its last reply)" if reply.samples == 1
                             else f"median of its last {reply.samples} replies)"))
            elif shared is not None:  # an evaluation at another batch: one stream's share of it, taken as above
                measured_together = False
                fastest.append(tokens / (shared.tok_s * streams))
                slowest.append(tokens / shared.tok_s)
                runs = _count(shared.samples, "earlier evaluation")
                basis.append(f"{model}: {shared.tok_s:.1f} tok/s per answer in {runs} here at another batch")
            else:
                missing.append(model)
        work = (f"{_count(len(questions), 'question')} ({_count(turns, 'turn')}) × at most {int(max_new_tokens):,} "
                f"tokens per answer × {_count(len(models), 'model')}, {streams} answer(s) at once per model")
        judged = {"pairwise": 2 * turns, "single": len(models) * turns}.get(mode, 0)
        then = f" Then {_count(judged, 'judge request')} (not in this estimate)." if judged else ""
        if missing:
            return Estimate(None, None, f"No time estimate yet: no speed measured for {', '.join(missing)} (a chat "
                                        f"reply or an evaluation measures it). The answers: {work}.{then}")
        # the models answer side by side (the likeliest figure: the slowest of them); at worst they take turns
        seconds = max(fastest)
        most = max(seconds, max(slowest) if measured_together else sum(slowest))
        ranged = most > seconds * 1.2
        why = (f" The shorter time if {streams} answers at once each run as fast as one alone (as on a GPU), the "
               "longer if running them together gains nothing (as on a busy CPU)." if ranged else "")
        headline = _span(seconds, most if ranged else seconds)
        return Estimate(seconds, most, f"⏱ **{headline}** for the answers: {work}. Based on {'; '.join(basis)}.{why} "
                                       f"Answers that stop before the limit take less.{then}")

    def evaluate(self, questions: Sequence[Question], a: str, b: str | None, *, mode: str = "pairwise",
                 max_new_tokens: int | None = None, owner: str | None = None) -> Iterator[EvaluationEvent]:
        """Run one evaluation (see the module docstring). Raises EvaluationBusy, ValueError (bad choice).
        ``owner`` (the visitor's page session) may stop it with ``stop_evaluation``; the last event then holds
        what was done (``result.cancelled``)."""
        if mode not in self.modes():
            raise ValueError(NO_JUDGE + " Only the answers can be generated (mode \"answers\")."
                             if mode in MODES else f"Unknown mode {mode!r}; choose one of: {', '.join(self.modes())}.")
        for name in (a, b):
            if name is not None and name not in self.engines:
                raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(self.engines)}.")
        if not self._evaluation.acquire(blocking=False):
            raise EvaluationBusy("Another evaluation is running in this app; please try again when it has finished.")
        try:
            params = self.answer_params
            if self.answer_defaults is not None:
                params = {m: self.answer_defaults(m) for m in (a, b) if m is not None}
            if max_new_tokens:
                params = ({m: dataclasses.replace(p, max_new_tokens=int(max_new_tokens)) for m, p in params.items()}
                          if isinstance(params, dict) else dataclasses.replace(params, max_new_tokens=int(max_new_tokens)))
            runner = EvaluationRunner(self.engines, judge=self.judge, answer_params=params, judge_params=self.params,
                                      max_in_flight=self.max_in_flight, timeout_s=self.timeout_s,
                                      dispatcher=self.dispatcher)     # its moderation rule checks every question
            self._running = (owner, runner)
            events: queue.Queue = queue.Queue()
            # at once, before moderation checks the questions: the page drops an earlier run's results now
            events.put(EvaluationEvent("answers", 0, len(questions) * len({a, b} - {None})))
            outcome: dict = {}

            def work():
                try:
                    outcome["result"] = runner.run(questions, a, b, mode=mode,
                                                   progress=lambda s, d, t: events.put(EvaluationEvent(s, d, t)))
                except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                    outcome["error"] = exc
                finally:
                    events.put(None)

            thread = threading.Thread(target=work, name="evaluation", daemon=True)
            thread.start()
            finished = False
            try:
                while (event := events.get()) is not None:
                    yield event
                finished = True
            finally:
                if not finished:
                    runner.cancel()
                    thread.join(timeout=30)
            if "error" in outcome:
                raise outcome["error"]
            result = outcome["result"]
            self._note_speeds(result, len(questions))
            summary = summarize(result)
            folder = Path(tempfile.mkdtemp(prefix="vicuna-eval-"))
            write_outputs(result, folder / "evaluation", summary)
            archive = Path(shutil.make_archive(str(folder / "evaluation"), "zip", folder, "evaluation"))
        finally:
            self._running = None
            self._evaluation.release()
        # the slot is free before the page draws the results: the next visitor need not wait for a plot
        yield EvaluationEvent("done", result=result, summary=summary, archive=archive)

    def _note_speeds(self, result: EvaluationResult, questions: int) -> None:
        """Each model's answer throughput in this run (its new answers' tokens over the answer time, the models
        side by side at this batch): what the next estimate at the same batch starts from. A stopped run says
        nothing reliable (the answers cut off are not counted, their time is)."""
        if result.cancelled:
            return
        streams = self.streams(len(result.models), questions)
        for model, answers in result.answers.items():
            tokens = sum(x.n_tokens for x in answers.values() if not x.reused)
            if result.answer_s >= 1.0:
                self.speeds.record_batch(model, tokens=tokens, seconds=result.answer_s, streams=streams)

    def stop_evaluation(self, owner: str | None) -> bool:
        """Stop the evaluation ``owner`` started (another visitor's is left alone): every request in flight is
        cancelled on its engine, and the run ends with what was done. -> whether there was one to stop."""
        running = self._running
        if running is None or running[0] != owner:
            return False
        running[1].cancel()
        return True

    @property
    def evaluation_running(self) -> bool:
        return self._evaluation.locked()
