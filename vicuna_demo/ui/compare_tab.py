"""Two models answer the same prompt side by side, and the visitor votes. One module, two uses:

- ``build_compare_tab(service, settings, anonymous=False)``: "👥 Side by side". The visitor picks
  Model A and Model B (the same model twice is allowed), each side with its own sampling parameters.
- ``build_compare_tab(service, settings, anonymous=True)``: "⚔️ Arena (anonymous)". ``arena.py`` draws
  two different models when a round starts; their names stay hidden (in the page and in the API
  output) until the visitor votes, then they are revealed. "🎲 New round" draws again.

A round: the visitor's text is checked once (limits, then ``service.moderate``), and that single
verdict goes to BOTH sides' ``service.reply``, so a flagged text reaches neither engine. Both replies
stream at once in one event: each side's iterator runs in its own thread and feeds a queue, and the
event yields whenever either side moved (two requests to one engine share its continuous batch).
Each side has its own Stop (a CancelToken per side in the visitor's state). Votes are enabled once
both replies have finished and are stored as a ``VoteRecord``; ``arena.battle_counts`` decides
whether the battle counts for the leaderboard (not after moderation, an error, or, when anonymous,
a reply that gave its model away).

API names (gradio_client), prefix ``compare_`` or ``arena_``: ``send``, ``regenerate``, ``vote``,
``stop_a``, ``stop_b``, and ``clear`` (named) or ``new_round`` (anonymous). See docs/arena.md.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import gradio as gr

from ..services.arena import VOTES, Arena, battle_counts, find_identity_leak, winner_for
from ..services.chat import CancelToken, ChatService, TurnContext, TurnUpdate, new_id, sanitize_input
from ..data.storage import VoteRecord
from .common import Turn, client_hash, render_turns, sampling_controls, turns_to_messages

log = logging.getLogger("vicuna_demo.ui.compare")

CURSOR = "▌"
SIDES = ("a", "b")
LABELS = {"a": "Model A", "b": "Model B"}
ERROR_STATUSES = ("error", "rejected")
HIDDEN_NOTE = "Model A and Model B stay anonymous until you vote."
REASON_TEXT = {
    "moderated": "a message was stopped by content moderation",
    "error": "a reply failed",
    "identity_leak": "a reply gave its model's name away",
}


@dataclass
class SideState:
    """One side of the comparison: its model, its own conversation, its own Stop."""

    model: str = ""
    conversation_id: str = field(default_factory=new_id)
    turns: list[Turn] = field(default_factory=list)
    cancel: CancelToken = field(default_factory=CancelToken)


@dataclass
class CompareState:
    """A visitor's battle: both sides, what happened in its rounds, and the vote once cast."""

    battle_id: str = field(default_factory=new_id)
    a: SideState = field(default_factory=SideState)
    b: SideState = field(default_factory=SideState)
    busy: bool = False
    rounds_done: int = 0
    moderated: bool = False
    errored: bool = False
    winner: str | None = None
    counted: bool | None = None
    not_counted_reason: str | None = None

    def side(self, key: str) -> SideState:
        return self.a if key == "a" else self.b

    @property
    def can_vote(self) -> bool:
        return self.rounds_done > 0 and not self.busy and self.winner is None

    def reset(self) -> None:
        """Stop both sides and start a new battle IN PLACE: gradio keeps handing this same object to the
        session's events, and a round still winding down must not write its old state back."""
        self.a.cancel.cancel()
        self.b.cancel.cancel()
        fresh = CompareState()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


def _hide_names(text: str, names: dict[str, str]) -> str:
    """Replace model names (longest first) by their side labels, for notices shown before the vote."""
    for name in sorted(names, key=len, reverse=True):
        if name:
            text = text.replace(name, names[name])
    return text


def build_compare_tab(service: ChatService, settings, anonymous: bool) -> None:
    """Add the comparison (``anonymous=False``) or the anonymous arena to the enclosing Blocks.

    Raises ``arena.ArenaConfigError`` when --arena-weights names an unknown model or a bad weight."""
    names = service.model_names()
    arena = Arena.from_settings(names, settings)
    prefix = "arena" if anonymous else "compare"
    if anonymous and not arena.can_battle:
        gr.Markdown(f"### ⚔️ Anonymous battles are not available\n{arena.unavailable_reason()}",
                    elem_id="arena-unavailable")
        return
    rng = random.SystemRandom()
    state = gr.State(lambda: CompareState())
    if anonymous:
        gr.Markdown("Two anonymous models answer your prompt. Chat as long as you like, then vote for the "
                    "better one: their names are revealed after your vote. 🎲 New round draws two new models.")
    else:
        gr.Markdown("Pick two models (the same one twice is fine, e.g. with different parameters), send one "
                    "prompt to both, and compare the replies.")
    pickers: dict[str, gr.Dropdown] = {}
    chatbots: dict[str, gr.Chatbot] = {}
    stops: dict[str, gr.Button] = {}
    with gr.Row():
        for key in SIDES:
            with gr.Column():
                if not anonymous:
                    default = names[0] if key == "a" else names[1 % len(names)]
                    pickers[key] = gr.Dropdown(names, value=default, label=LABELS[key],
                                               elem_id=f"{prefix}-model-{key}")
                chatbots[key] = gr.Chatbot(label=LABELS[key], height=420, elem_id=f"{prefix}-chatbot-{key}",
                                           sanitize_html=True, render_markdown=True, buttons=["copy"])
                stops[key] = gr.Button(f"⏹ Stop {key.upper()}", variant="stop", size="sm",
                                       elem_id=f"{prefix}-stop-{key}")
    reveal = gr.Markdown(HIDDEN_NOTE if anonymous else "", elem_id=f"{prefix}-reveal")
    vote_buttons: dict[str, gr.Button] = {}
    with gr.Row():
        for label in VOTES:
            vote_buttons[label] = gr.Button(label, interactive=False, elem_id=f"{prefix}-vote-{VOTES[label]}"
                                            .replace(" ", "-").replace("(", "").replace(")", ""))
    notice = gr.Markdown(elem_id=f"{prefix}-notice")
    with gr.Row():
        textbox = gr.Textbox(placeholder="Type a prompt for both models and press Enter", show_label=False,
                             scale=8, max_lines=12, elem_id=f"{prefix}-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{prefix}-send")
    with gr.Row():
        regenerate = gr.Button("🔄 Regenerate", elem_id=f"{prefix}-regenerate")
        reset = gr.Button("🎲 New round" if anonymous else "🗑️ Clear",
                          elem_id=f"{prefix}-{'new-round' if anonymous else 'clear'}")
    with gr.Accordion("Parameters", open=False):
        controls: dict[str, tuple] = {}
        if anonymous:
            controls["a"] = controls["b"] = sampling_controls(settings, service.limits.max_new_tokens)
        else:
            with gr.Row():
                for key in SIDES:
                    with gr.Column():
                        gr.Markdown(f"**{LABELS[key]}**")
                        controls[key] = sampling_controls(settings, service.limits.max_new_tokens)
    vote_choice = gr.Textbox(visible=False)  # the /vote API's input
    vote_api = gr.Button(visible=False)

    # -- views --------------------------------------------------------------------------------------
    def revealed_names(st: CompareState) -> str:
        if not anonymous:
            return ""
        if st.winner is None:
            return HIDDEN_NOTE
        text = f"**Model A: {st.a.model} · Model B: {st.b.model}**"
        if not st.counted:
            reasons = [REASON_TEXT.get(r, r) for r in (st.not_counted_reason or "").split(",") if r]
            text += f"\n\nThis battle is not counted in the leaderboard: {'; '.join(reasons)}."
        return text

    def view(st: CompareState, cursors=("", ""), extra: dict | None = None) -> dict:
        out = {chatbots[k]: render_turns(st.side(k).turns, cursor=c) for k, c in zip(SIDES, cursors)}
        out.update({button: gr.update(interactive=st.can_vote) for button in vote_buttons.values()})
        out[reveal] = revealed_names(st)
        out[state] = st
        out.update(extra or {})
        return out

    outputs = [*chatbots.values(), *vote_buttons.values(), reveal, notice, textbox, state]

    # -- a round --------------------------------------------------------------------------------------
    def side_worker(side: SideState, key: str, messages, params, verdict, ctx, inbox: queue.Queue) -> None:
        try:
            for update in service.reply(side.model, messages, params, verdict, ctx, side.cancel):
                inbox.put((key, dataclasses.replace(update)))
        except BaseException as exc:  # noqa: BLE001 - report it on this side, never hang the other
            log.exception("compare side %s crashed", key)
            inbox.put((key, TurnUpdate(done=True, status="error", model=side.model,
                                       notice=f"⚠️ Something went wrong on this side ({type(exc).__name__}).")))
        finally:
            inbox.put((key, None))

    def run_round(st: CompareState, params: dict, chash: str):
        """Stream both sides' replies to their last turn; yields views. Moderates once, for both sides."""
        battle, sides = st.battle_id, {key: st.side(key) for key in SIDES}
        verdict = service.moderate([st.a.turns[-1].user])
        inbox: queue.Queue = queue.Queue()
        workers = []
        hidden = {st.a.model: LABELS["a"], st.b.model: LABELS["b"]} if anonymous else {}
        for key, side in sides.items():
            side.cancel.arm()
            engine = service.engines.get(side.model)
            system = getattr(engine, "default_system", "") or None
            messages = turns_to_messages(side.turns, system)
            ctx = TurnContext(conversation_id=side.conversation_id, turn_index=len(side.turns), client_hash=chash,
                              battle_id=st.battle_id, side=key)
            workers.append(threading.Thread(target=side_worker, name=f"compare-{key}", daemon=True,
                                            args=(side, key, messages, params[key], verdict, ctx, inbox)))
        statuses = {key: "streaming" for key in SIDES}
        pending = set(SIDES)
        st.busy = True
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
                    turn = sides[key].turns[-1]
                    turn.reply, turn.model = update.reply, update.model
                    turn.notice = _hide_names(update.notice, hidden) if hidden else update.notice
                    turn.in_context = update.status in ("done", "cancelled", "streaming") and bool(update.reply)
                    if update.done:
                        statuses[key] = update.status
                        turn.footer = update.stats.summary() if (update.stats and update.stats.n_tokens) else ""
                if pending:
                    yield view(st, tuple("" if statuses[k] != "streaming" else CURSOR for k in SIDES))
        finally:
            if pending:  # the visitor left mid-round: stop both generations
                for side in sides.values():
                    side.cancel.cancel()
            if st.battle_id == battle:
                st.busy = False
        if st.battle_id != battle:  # Clear / New round during the round: this round no longer exists
            yield view(st)
            return
        st.rounds_done += 1
        st.moderated |= any(s == "moderated" for s in statuses.values())
        st.errored |= any(s in ERROR_STATUSES for s in statuses.values())
        yield view(st)

    def problem_with(st: CompareState, text: str, chash: str, *, new_message: bool) -> str:
        if st.busy:
            return "Please wait for both replies (or press Stop) before sending again."
        if st.winner is not None:
            what = "🎲 New round" if anonymous else "🗑️ Clear"
            return f"You already voted on this battle. Press {what} to start another."
        for key in SIDES:
            if st.side(key).model and st.side(key).model not in service.engines:
                return f"Unknown model {st.side(key).model!r}; choose one of: {', '.join(service.engines)}."
        turns_before = len(st.a.turns) - (0 if new_message else 1)
        return service.check_message(text, turns_before, chash)

    def start_round(text, st: CompareState, models: tuple[str, str] | None, params: dict, request: gr.Request):
        text = sanitize_input(text)
        chash = client_hash(service, request)
        notes = []
        if models is not None and (st.a.model, st.b.model) != models and not st.busy:
            if st.a.turns:  # the vote must name the models that answered: start afresh
                st.reset()
                notes.append("The models changed, so a new comparison started.")
            st.a.model, st.b.model = models
        problem = problem_with(st, text, chash, new_message=True)
        if problem:
            yield view(st, extra={notice: problem, textbox: gr.update()})
            return
        if not st.a.model:  # anonymous: draw the pair when the battle's first round starts
            st.a.model, st.b.model = arena.sample_pair(rng)
        for key in SIDES:
            st.side(key).turns.append(Turn(user=text))
        note = " ".join(notes)
        yield view(st, (CURSOR, CURSOR), extra={notice: note, textbox: ""})
        for out in run_round(st, params, chash):
            out.update({notice: note, textbox: ""})
            yield out

    def regenerate_round(st: CompareState, params: dict, request: gr.Request):
        chash = client_hash(service, request)
        if not st.a.turns:
            yield view(st, extra={notice: "There is no reply to regenerate yet."})
            return
        problem = problem_with(st, st.a.turns[-1].user, chash, new_message=False)
        if problem:
            yield view(st, extra={notice: problem})
            return
        for key in SIDES:
            side = st.side(key)
            side.turns[-1] = Turn(user=side.turns[-1].user)
        yield view(st, (CURSOR, CURSOR), extra={notice: ""})
        for out in run_round(st, params, chash):
            out[notice] = ""
            yield out

    def cast_vote(choice: str, st: CompareState, request: gr.Request) -> dict:
        if st.winner is not None:
            return view(st, extra={notice: "You already voted on this battle."})
        if not st.can_vote:
            return view(st, extra={notice: "Votes open once both replies have finished."})
        try:
            winner = winner_for(choice)
        except ValueError as exc:
            return view(st, extra={notice: str(exc)})
        replies = [t.reply for k in SIDES for t in st.side(k).turns]
        counted, reason = battle_counts(anony=anonymous, replies=replies, errored=st.errored,
                                        moderated=st.moderated, leak_words=arena.leak_words)
        record = VoteRecord(battle_id=st.battle_id, tstamp=time.time(), client_hash=client_hash(service, request),
                            anony=anonymous, model_a=st.a.model, model_b=st.b.model, winner=winner,
                            counted=counted, not_counted_reason=reason, conversation_a_id=st.a.conversation_id,
                            conversation_b_id=st.b.conversation_id)
        service.store.log_vote(record)
        st.winner, st.counted, st.not_counted_reason = winner, counted, reason
        if reason and "identity_leak" in reason:
            log.info("battle %s not counted: identity word %r", st.battle_id,
                     find_identity_leak(replies, arena.leak_words))
        again = "🎲 New round" if anonymous else "🗑️ Clear"
        thanks = f"Thanks for voting! Press {again} to start another battle."
        if not anonymous and not counted:
            thanks += f" (Not counted in the leaderboard: {REASON_TEXT.get(reason.split(',')[0], reason)}.)"
        return view(st, extra={notice: thanks})

    def stop_side(key: str):
        def stop(st: CompareState) -> None:
            st.side(key).cancel.cancel()
        return stop

    def reset_battle(st: CompareState):
        st.reset()
        return view(st, extra={notice: "", textbox: ""})

    # -- wiring: adapters from each mode's inputs to the shared handlers --------------------------------
    def params_of(values) -> dict:
        if anonymous:
            shared = service.params(*values[:3])
            return {"a": shared, "b": shared}
        return {"a": service.params(*values[:3]), "b": service.params(*values[3:6])}

    slider_inputs = list(controls["a"]) if anonymous else [*controls["a"], *controls["b"]]
    model_inputs = [] if anonymous else [pickers["a"], pickers["b"]]

    if anonymous:
        def send_fn(text, temperature, top_p, max_tokens, st: CompareState, request: gr.Request):
            yield from start_round(text, st, None, params_of((temperature, top_p, max_tokens)), request)

        def regenerate_fn(temperature, top_p, max_tokens, st: CompareState, request: gr.Request):
            yield from regenerate_round(st, params_of((temperature, top_p, max_tokens)), request)
    else:
        def send_fn(text, model_a, model_b, temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b,
                    max_tokens_b, st: CompareState, request: gr.Request):
            values = (temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b, max_tokens_b)
            yield from start_round(text, st, (model_a, model_b), params_of(values), request)

        def regenerate_fn(temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b, max_tokens_b,
                          st: CompareState, request: gr.Request):
            values = (temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b, max_tokens_b)
            yield from regenerate_round(st, params_of(values), request)

    def vote_fn(choice, st: CompareState, request: gr.Request):
        return cast_vote(choice, st, request)

    def model_changed(st: CompareState):
        """Changing a model mid-conversation starts a new comparison (the vote must name who answered)."""
        if not st.a.turns:
            return view(st)
        st.reset()
        return view(st, extra={notice: "The models changed, so a new comparison started."})

    common = dict(concurrency_id="generate", concurrency_limit="default")  # the --concurrency pool
    send_inputs = [textbox, *model_inputs, *slider_inputs, state]
    send.click(send_fn, send_inputs, outputs, api_name=f"{prefix}_send", **common)
    textbox.submit(send_fn, send_inputs, outputs, api_name=False, **common)
    regenerate.click(regenerate_fn, [*slider_inputs, state], outputs, api_name=f"{prefix}_regenerate", **common)
    vote_api.click(vote_fn, [vote_choice, state], outputs, api_name=f"{prefix}_vote")
    for label, button in vote_buttons.items():
        button.click(_fixed_vote(vote_fn, label), [state], outputs, api_name=False)
    for key in SIDES:
        stops[key].click(stop_side(key), [state], None, api_name=f"{prefix}_stop_{key}", queue=False)
    reset.click(reset_battle, [state], outputs, api_name=f"{prefix}_{'new_round' if anonymous else 'clear'}",
                queue=False)
    for chatbot in chatbots.values():  # the pane's own 🗑 icon clears the battle, not just the display
        chatbot.clear(reset_battle, [state], outputs, api_name=False, queue=False)
    for picker in pickers.values():
        picker.change(model_changed, [state], outputs, api_name=False, queue=False)


def _fixed_vote(vote_fn, label: str):
    def vote_button(st: CompareState, request: gr.Request):
        return vote_fn(label, st, request)
    return vote_button
