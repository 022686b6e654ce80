"""A battle: two models answer the same prompts side by side, then the visitor votes. No gradio here.

    battles = BattleService(chat_service, Arena.from_settings(models, settings))   # once, at start-up
    battle = Battle(anonymous=True)                                # one per visitor and tab (gr.State)
    for update in battles.send(battle, "Hello", params=(0.7, 1.0, 256, 1.1), client="hash"):
        battle.a.exchanges[-1].reply, battle.b.exchanges[-1].reply # both stream at once
    battles.vote(battle, "a", client="hash")                       # -> the notice to show; names revealed

Two uses, one module: named (the visitor picks both models, ``models=("A", "B")`` on each send; the
same model twice is allowed) and anonymous (``Battle(anonymous=True)``: the arena draws two different
models when the first round starts; their names stay out of everything shown until the vote).

A round: the visitor's text is checked once (the session gate, limits, unknown models), each side's
messages are built as a frozen snapshot, the text is moderated ONCE and that verdict goes to both
sides' ``ChatService.reply``, so a flagged text reaches neither model. In an anonymous battle an error's
own text (which may carry the model's name or its endpoint's address) goes to the operator's log, and the
visitor sees ``ANONYMOUS_ERROR``, or ``ANONYMOUS_TOO_LONG`` for a message that does not fit a side's context
window (its token counts would tell the model apart). Both replies stream at once:
each side runs in its own thread and feeds a queue; the round yields whenever either side moved.
Each side has its own Stop, and one Stop halts both. Votes open when a round has finished and are stored as a ``VoteRecord``;
``arena.battle_counts`` decides whether the battle counts for the leaderboard (not after moderation,
an error, or, when anonymous, a reply that gave its model away). Once a vote is stored, the work that
follows it runs on a background worker (services/after_vote.py): the judge's category labels of a
counted anonymous battle's first prompt (with ``--judge``; never for a prompt moderation stopped) and, every
``--outlier-check-every`` votes, the outlier-voter check.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Iterator, Mapping, Sequence

from ..data.categories import rule_labels, warm
from ..data.storage import StoreUnavailable, VoteRecord
from ..data.style import StyleCounts, conv_metadata, count_replies
from .after_vote import BackgroundWorker, JudgeLabeller, OutlierCheck
from .arena import (MIN_SHOWN_TOKENS, REASON_DAILY_CAP, VOTES, Arena, NotEnoughModels, battle_counts,
                    find_identity_leak, winner_for)
from .chat import NOTHING_TO_REGENERATE, ChatService, TurnContext, TurnUpdate, sanitize_input
from .session import CancelToken, Exchange, Gate, messages_for, new_id

log = logging.getLogger("vicuna_demo.services.battle")

SIDES = ("a", "b")
LABELS = {"a": "Model A", "b": "Model B"}
ERROR_STATUSES = ("error", "rejected")
BUSY_NOTICE = "Please wait for both replies (or press Stop) before sending another message."
HIDDEN_NOTE = "Model A and Model B stay anonymous until you vote."
MODELS_CHANGED = "The models changed, so a new comparison started."
# an error in an anonymous battle: the engine's own text can name the model or its address (and a visitor
# can cause one on purpose), so the visitor gets this and the operator's log the detail
ANONYMOUS_ERROR = ("⚠️ {side} could not answer this time (an error on its side). This battle will not count; "
                   "press 🎲 New round to try two models again.")
# a message too long for one side: its token or character counts would tell the model's context window apart
ANONYMOUS_TOO_LONG = ("⚠️ Your message is too long for {side} (it does not fit that model's context window). This "
                      "battle will not count; press 🎲 New round and send a shorter message.")
REASON_TEXT = {
    "moderated": "a message was stopped by content moderation",
    "error": "a reply failed",
    "identity_leak": "a reply gave its model's name away",
    "same_model": "both sides were the same model, which says nothing about which model is better",
    "unread": f"a reply was stopped before {MIN_SHOWN_TOKENS} tokens of it were shown, so it could not be judged",
    "daily_cap": "you reached today's limit of counted votes (it keeps one visitor from deciding the ranking)",
}
OTHER_VISITOR = "This battle was served to another visitor: only they can vote on it."
DAY_S = 24 * 3600


@dataclass
class Side:
    """One side of a battle: its model, its own conversation, its own Stop."""

    model: str = ""
    conversation_id: str = field(default_factory=new_id)
    exchanges: list[Exchange] = field(default_factory=list)
    cancel: CancelToken = field(default_factory=CancelToken)

    @property
    def streaming(self) -> bool:
        return bool(self.exchanges) and not self.exchanges[-1].done


@dataclass
class Battle:
    """A visitor's battle: both sides, what happened in its rounds, and the vote once cast."""

    anonymous: bool = False
    battle_id: str = field(default_factory=new_id)
    a: Side = field(default_factory=Side)
    b: Side = field(default_factory=Side)
    gate: Gate = field(default_factory=Gate)
    rounds_done: int = 0
    moderated: bool = False
    errored: bool = False
    winner: str | None = None
    counted: bool | None = None
    not_counted_reason: str | None = None
    client: str | None = None    # the visitor identity the battle was served to (its first round's)
    sampling: dict | None = None  # anonymous: the pair-sampling weights in force when the pair was drawn

    def __deepcopy__(self, memo):  # gradio deep-copies a session's initial value: a fresh battle
        return Battle(anonymous=self.anonymous)

    def side(self, key: str) -> Side:
        return self.a if key == "a" else self.b

    @property
    def busy(self) -> bool:
        return self.gate.busy

    @property
    def can_vote(self) -> bool:
        return self.rounds_done > 0 and not self.busy and self.winner is None

    def shown(self) -> dict:
        """How much of each side's reply of the last round the visitor saw: tokens, characters, and how it
        ended ("done", "cancelled" when stopped, "error", ...)."""
        shown = {}
        for key in SIDES:
            last = self.side(key).exchanges[-1] if self.side(key).exchanges else None
            shown[key] = {"tokens": last.stats.n_tokens if last and last.stats else 0,
                          "chars": len(last.reply) if last else 0,
                          "status": last.status if last else "none"}
        return shown

    @property
    def vote_label(self) -> str | None:
        """The vote button label of the visitor's vote (None before the vote)."""
        return next((label for label, winner in VOTES.items() if winner == self.winner), None)

    def reset(self, keep_gate: bool = False) -> None:
        """Stop both sides and start a new battle IN PLACE (gradio keeps handing this same object to the
        session's events). A round still winding down keeps the old sides and the old gate, so it writes
        nothing back here and does not hold up the new battle (``keep_gate``: the caller holds the gate
        and goes on with the new battle)."""
        self.a.cancel.cancel()
        self.b.cancel.cancel()
        fresh = Battle(anonymous=self.anonymous)
        for f in fields(self):
            if not (keep_gate and f.name == "gate"):
                setattr(self, f.name, getattr(fresh, f.name))


@dataclass
class RoundUpdate:
    """What a round tells the UI besides the battle itself (whose exchanges follow the replies)."""

    notice: str = ""
    done: bool = False
    refused: bool = False        # nothing was sent (busy, a limit, voted already...): ``notice`` says why


def _hide_names(text: str, names: Mapping[str, str]) -> str:
    """Replace model names (longest first) by their side labels, for what is shown before the vote."""
    for name in sorted(names, key=len, reverse=True):
        if name:
            text = text.replace(name, names[name])
    return text


def counted_text(counted: bool, reason: str | None) -> str:
    """Whether a vote counts in the leaderboard, and every reason it does not, as one sentence."""
    if counted:
        return "Your vote counts in the leaderboard."
    reasons = [REASON_TEXT.get(r, r) for r in (reason or "").split(",") if r]
    return f"Your vote is kept but not counted in the leaderboard: {'; '.join(reasons)}."


def _style(side: Side) -> StyleCounts:
    """The style counts of what a side answered (its replies as shown, the engine's token counts)."""
    return count_replies((e.reply, e.stats.n_tokens if e.stats else None) for e in side.exchanges)


def _side_params(params) -> dict[str, tuple]:
    """``(t, p, n[, r])`` for both sides, or ``{"a": (t, p, n[, r]), "b": (...)}``; None or a missing value
    means that side's model's default."""
    if isinstance(params, Mapping):
        return {key: tuple(params[key]) for key in SIDES}
    return {key: tuple(params or ()) for key in SIDES}


class BattleService:
    """Battles for every visitor (thread-safe; the visitor's data lives in their ``Battle``)."""

    def __init__(self, chat: ChatService, arena: Arena, rng: random.Random | None = None, daily_vote_cap: int = 0,
                 judge: str | None = None, outlier_check_every: int = 0):
        self.chat = chat
        self.arena = arena
        self.rng = rng or random.SystemRandom()
        self.daily_vote_cap = daily_vote_cap  # counted votes per visitor identity in 24 hours; 0 = no cap
        self._cap_lock = threading.Lock()     # one visitor's votes from several sessions: checked one at a time
        # after a vote, off the visitor's path: the judge's category labels, the outlier-voter check
        self.worker = BackgroundWorker("after-vote")
        self.labeller = (JudgeLabeller(chat.engines[judge], judge, chat.store, self.worker, dispatcher=chat.dispatcher)
                         if judge and judge in chat.engines else None)     # the chat's one path to the engines
        self.outliers = OutlierCheck(chat.store, self.worker, every=outlier_check_every)
        # the language model of the category labels loads in a few seconds: now, not at the first vote
        threading.Thread(target=warm, name="categories-warm", daemon=True).start()

    @classmethod
    def from_settings(cls, chat: ChatService, settings) -> "BattleService":
        """Reads --arena-weights, --identity-words, --daily-vote-cap, --judge and --outlier-check-every; raises
        ``arena.ArenaConfigError``."""
        return cls(chat, Arena.from_settings(chat.model_names(), settings),
                   daily_vote_cap=getattr(settings, "daily_vote_cap", 0), judge=getattr(settings, "judge", None),
                   outlier_check_every=getattr(settings, "outlier_check_every", 0))

    def close(self) -> None:
        """Let the after-vote worker finish what is queued, then stop it."""
        self.worker.close()

    # -- a round ------------------------------------------------------------------------------------
    def send(self, battle: Battle, text, *, models: Sequence[str] | None = None, params=(),
             client: str = "unknown") -> Iterator[RoundUpdate]:
        """Send ``text`` to both sides and stream both replies. ``models`` (named battles) picks the two
        models; changing them after a round starts a new battle. ``params``: ``(temperature, top_p,
        max_new_tokens, repetition_penalty)`` for both sides or ``{"a": (...), "b": (...)}``; a missing or None
        value takes each side's own model's default (ChatService.defaults_for), so in the anonymous arena
        each model answers with its own recommended settings unless the visitor set a value."""
        yield from self._gated(battle, lambda: self._round(battle, text, models, params, client, False))

    def regenerate(self, battle: Battle, *, params=(), client: str = "unknown") -> Iterator[RoundUpdate]:
        """Ask both sides again for the reply to the last message (checked and moderated again)."""
        yield from self._gated(battle, lambda: self._round(battle, None, None, params, client, True))

    def _gated(self, battle: Battle, run) -> Iterator[RoundUpdate]:
        gate = battle.gate  # this battle's: a reset during the round gives the new battle its own
        if not gate.begin():
            yield RoundUpdate(notice=BUSY_NOTICE, done=True, refused=True)
            return
        held = True
        try:
            for update in run():
                if update.done:  # the last view already shows the battle free again (votes open)
                    gate.end()
                    held = False
                yield update
        finally:
            if held:
                gate.end()

    def _problem(self, battle: Battle, text: str, client: str, turns_before: int) -> str:
        if battle.winner is not None:
            what = "🎲 New round" if battle.anonymous else "🗑️ Clear"
            return f"You already voted on this battle. Press {what} to start another."
        for key in SIDES:
            model = battle.side(key).model
            if model and self.chat.check_model(model):
                return self.chat.check_model(model)
        return self.chat.check_message(text, turns_before, client)

    def _round(self, battle: Battle, text, models, params, client: str, regenerate: bool):
        notes = []
        if models is not None and (battle.a.model, battle.b.model) != tuple(models):
            if battle.a.exchanges:  # the vote must name the models that answered: start afresh
                battle.reset(keep_gate=True)
                notes.append(MODELS_CHANGED)
            battle.a.model, battle.b.model = models
        if regenerate:
            if not battle.a.exchanges:
                yield RoundUpdate(notice=NOTHING_TO_REGENERATE, done=True, refused=True)
                return
            text = battle.a.exchanges[-1].user
        else:
            text = sanitize_input(text)
        problem = self._problem(battle, text, client, len(battle.a.exchanges) - (1 if regenerate else 0))
        if problem:
            yield RoundUpdate(notice=problem, done=True, refused=True)
            return
        if battle.client is None:  # the vote will be taken from this visitor only
            battle.client = client
        if not battle.a.model:  # anonymous: draw the pair when the battle's first round starts
            try:
                battle.a.model, battle.b.model = self.arena.sample_pair(self.rng)
            except NotEnoughModels as exc:
                yield RoundUpdate(notice=str(exc), done=True, refused=True)
                return
            battle.sampling = self.arena.sampling_record(battle.a.model, battle.b.model)
        side_params = {key: self.chat.params(*values, model=battle.side(key).model)
                       for key, values in _side_params(params).items()}
        sides = {key: battle.side(key) for key in SIDES}
        snapshots, exchanges = {}, {}
        for key, side in sides.items():
            history = side.exchanges[:-1] if regenerate else side.exchanges
            snapshots[key] = messages_for(history, self.chat.default_system(side.model) or None, text)
            exchanges[key] = Exchange(user=text, model=side.model)
            if regenerate:
                side.exchanges[-1] = exchanges[key]
            else:
                side.exchanges.append(exchanges[key])
            side.cancel.arm()
        note = " ".join(notes)
        yield RoundUpdate(notice=note)
        yield from self._stream(battle, sides, snapshots, exchanges, side_params, client, note)

    def _stream(self, battle: Battle, sides, snapshots, exchanges, params, client, note):
        """Moderate the round's text once, run both sides in threads, yield whenever one moved."""
        battle_id = battle.battle_id
        verdict = self.chat.moderate([snapshots["a"][-1]["content"]])  # the same user text on both sides
        hidden = {sides["a"].model: LABELS["a"], sides["b"].model: LABELS["b"]} if battle.anonymous else {}
        inbox: queue.Queue = queue.Queue()
        workers = []
        for key, side in sides.items():
            ctx = TurnContext(conversation_id=side.conversation_id, turn_index=len(side.exchanges),
                              client_hash=client, battle_id=battle_id, side=key)
            workers.append(threading.Thread(target=self._side_worker, name=f"battle-{key}", daemon=True,
                                            args=(side, key, snapshots[key], params[key], verdict, ctx, inbox)))
        statuses = {key: "streaming" for key in SIDES}
        pending = set(SIDES)
        try:
            for worker in workers:
                worker.start()
            while pending:
                items = [inbox.get()]
                while True:
                    try:
                        items.append(inbox.get_nowait())
                    except queue.Empty:
                        break
                for key, update in items:
                    if update is None:
                        pending.discard(key)
                        continue
                    if hidden and update.status in ERROR_STATUSES:  # the text may name the model, its address...
                        log.warning("anonymous battle %s, %s (%s): %s", battle_id, LABELS[key], sides[key].model,
                                    update.notice)
                        notice = ANONYMOUS_TOO_LONG if update.status == "rejected" else ANONYMOUS_ERROR
                        update.notice = notice.format(side=LABELS[key])
                    elif hidden:
                        update.notice = _hide_names(update.notice, hidden)
                    exchanges[key].apply(update)
                    if update.done:
                        statuses[key] = update.status
                if pending:
                    yield RoundUpdate(notice=note)
        finally:
            if pending:  # the visitor left mid-round: stop both generations
                for side in sides.values():
                    side.cancel.cancel()
        if battle.battle_id == battle_id:  # not reset meanwhile (Clear / New round / another model)
            battle.rounds_done += 1
            battle.moderated |= any(s == "moderated" for s in statuses.values())
            battle.errored |= any(s in ERROR_STATUSES for s in statuses.values())
        yield RoundUpdate(notice=note, done=True)

    def _side_worker(self, side: Side, key, messages, params, verdict, ctx, inbox: queue.Queue) -> None:
        try:
            for update in self.chat.reply(side.model, messages, params, verdict, ctx, side.cancel):
                inbox.put((key, TurnUpdate(reply=update.reply, done=update.done, status=update.status,
                                           notice=update.notice, stats=update.stats, model=update.model)))
        except BaseException as exc:  # noqa: BLE001 - report it on this side, never hang the other
            log.exception("battle side %s crashed", key)
            inbox.put((key, TurnUpdate(done=True, status="error", model=side.model,
                                       notice=f"⚠️ Something went wrong on this side ({type(exc).__name__}).")))
        finally:
            inbox.put((key, None))

    # -- the rest of a battle ----------------------------------------------------------------------------
    def vote(self, battle: Battle, choice, client: str = "unknown") -> str:
        """Store the visitor's vote (once per battle) -> the notice to show."""
        if battle.winner is not None:
            return "You already voted on this battle."
        gate = battle.gate
        if not gate.begin():  # a round is running (or another vote is being stored)
            return "Votes open once both replies have finished."
        try:
            if battle.winner is not None:
                return "You already voted on this battle."
            if battle.rounds_done == 0:
                return "Votes open once both replies have finished."
            try:
                winner = winner_for(choice if isinstance(choice, str) else "")
            except ValueError as exc:
                return str(exc)
            if battle.client is not None and client != battle.client:
                log.warning("battle %s: a vote from another visitor identity was refused", battle.battle_id)
                return OTHER_VISITOR
            replies = [e.reply for key in SIDES for e in battle.side(key).exchanges]
            shown = battle.shown()
            counted, reason = battle_counts(anony=battle.anonymous, replies=replies, errored=battle.errored,
                                            moderated=battle.moderated, leak_words=self.arena.leak_words,
                                            same_model=battle.a.model == battle.b.model, shown=shown)
            with self._cap_lock:
                if counted and self.daily_vote_cap and self.chat.store.count_counted_votes(
                        client, since=time.time() - DAY_S) >= self.daily_vote_cap:
                    counted, reason = False, REASON_DAILY_CAP
                record = VoteRecord(battle_id=battle.battle_id, tstamp=time.time(), client_hash=client,
                                    anony=battle.anonymous, model_a=battle.a.model, model_b=battle.b.model,
                                    winner=winner, counted=counted, not_counted_reason=reason,
                                    conversation_a_id=battle.a.conversation_id,
                                    conversation_b_id=battle.b.conversation_id,
                                    conv_metadata=conv_metadata(_style(battle.a), _style(battle.b)), shown=shown,
                                    categories=rule_labels(battle.a.exchanges[0].user, len(battle.a.exchanges)),
                                    sampling=battle.sampling)
                try:
                    self.chat.store.log_vote(record)
                except StoreUnavailable:  # a shared database that stayed down: the vote is not taken, say so
                    return ("⚠️ Your vote could not be saved (the database is unreachable). "
                            "Please vote again in a moment.")
            battle.winner, battle.counted, battle.not_counted_reason = winner, counted, reason
        finally:
            gate.end()
        self._after_vote(battle)
        if reason and "identity_leak" in reason:
            log.info("battle %s not counted: identity word %r", battle.battle_id,
                     find_identity_leak(replies, self.arena.leak_words))
        again = "🎲 New round" if battle.anonymous else "🗑️ Clear"
        return f"Thanks for voting! {counted_text(counted, reason)} Press {again} to start another battle."

    def _after_vote(self, battle: Battle) -> None:
        """Queue what follows a stored vote (never waited for): the judge's labels of an anonymous battle's first
        prompt when the vote counts (the category boards read counted votes only, and a visitor past the daily
        cap cannot keep the judge busy) and moderation stopped no message of it (a flagged text reaches no
        model); the outlier check."""
        if battle.winner is None:
            return
        if battle.anonymous and battle.counted and self.labeller is not None and not battle.moderated:
            self.labeller.submit(battle.battle_id, battle.a.exchanges[0].user)
        self.outliers.vote_stored()

    def stop(self, battle: Battle, key: str | None = None) -> None:
        """Stop one side's reply (``key`` "a" or "b"), or both (None: the one Stop under the text box)."""
        for side in SIDES if key is None else [k for k in SIDES if k == key]:
            battle.side(side).cancel.cancel()

    def reset(self, battle: Battle) -> None:
        battle.reset()

    def models_changed(self, battle: Battle) -> str:
        """A model picker changed: a battle under way starts afresh (the vote must name who answered)."""
        if not battle.a.exchanges:
            return ""
        battle.reset()
        return MODELS_CHANGED

    def reveal(self, battle: Battle) -> str:
        """The line under the panes: anonymous until the vote, then the names (and why it is not counted)."""
        if not battle.anonymous:
            return ""
        if battle.winner is None:
            return HIDDEN_NOTE
        text = f"**Model A: {battle.a.model} · Model B: {battle.b.model}**"
        if not battle.counted:
            text += f"\n\n{counted_text(False, battle.not_counted_reason)}"
        return text
