"""Two models answer the same prompt side by side, and the visitor votes. One module, two uses:

- ``build_compare_tab(battles, anonymous=False)``: "👥 Side by side". The visitor picks Model A and
  Model B (the same model twice is allowed), each side with its own sampling parameters.
- ``build_compare_tab(battles, anonymous=True)``: "⚔️ Arena (anonymous)". Two different models are
  drawn when a round starts; their names stay hidden (in the page and in the API output) until the
  visitor votes. "🎲 New round" starts another battle.

Rendering only: the battle (state machine, both sides streaming, moderation once for both, votes)
lives in ``services/battle.py``; each event here is one call into ``BattleService`` with the visitor's
``Battle`` (in ``gr.State``). Send and Enter are gradio's two-step event (show the message and clear
the box, then ``.then`` stream the round); gradio_client does not follow ``.then`` chains, so the
``*_send`` API is a one-call endpoint running the same service call.

API names (gradio_client), prefix ``compare_`` or ``arena_``: ``send``, ``regenerate``, ``vote``,
``stop`` (both sides, the Stop next to Send), ``stop_a``, ``stop_b``, and ``clear`` (named) or ``new_round`` (anonymous). See docs/arena.md.

Sampling (ui/sampling.py): each side's sliders follow its model's defaults; in the arena a slider left at
its starting value means each model's own default. The repetition penalty comes last in the API inputs
(after the existing sliders, ``_a`` then ``_b`` when named), so older callers keep their positions.
"""

from __future__ import annotations

import functools

import gradio as gr

from ..services.arena import VOTES
from ..services.battle import LABELS, SIDES, Battle, BattleService, RoundUpdate
from ..services.judge import JudgeService
from .common import client_hash, render_exchanges
from .sampling import ARENA_NOTE, follow_model, sampling_controls, unless_at_start
from .judge_panel import add_judge_panel


def _vote_id(prefix: str, winner: str) -> str:
    return f"{prefix}-vote-{winner}".replace(" ", "-").replace("(", "").replace(")", "")


def build_compare_tab(battles: BattleService, anonymous: bool, judge: JudgeService | None = None) -> None:
    """Add the comparison (``anonymous=False``) or the anonymous arena to the enclosing Blocks; the named
    comparison gets the "⚖️ Ask the judge" button when ``judge`` is given (``judge_panel.py``)."""
    service = battles.chat
    names = service.model_names()
    prefix = "arena" if anonymous else "compare"
    if anonymous and not battles.arena.can_battle:
        gr.Markdown(f"### ⚔️ Anonymous battles are not available\n{battles.arena.unavailable_reason()}",
                    elem_id="arena-unavailable")
        return
    state = gr.State(lambda: Battle(anonymous=anonymous))
    sent = gr.State("")  # the message between the two steps of Send
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
                if anonymous:
                    gr.Markdown(f"**{LABELS[key]}**", elem_classes=["pane-label"])
                else:
                    default = names[0] if key == "a" else names[1 % len(names)]
                    pickers[key] = gr.Dropdown(names, value=default, label=LABELS[key],
                                               elem_id=f"{prefix}-model-{key}")
                chatbots[key] = gr.Chatbot(label=LABELS[key], show_label=False, height=420,
                                           elem_id=f"{prefix}-chatbot-{key}", sanitize_html=True,
                                           render_markdown=True, buttons=["copy"])
                stops[key] = gr.Button(f"⏹ Stop {key.upper()}", variant="stop", size="sm", interactive=False,
                                       elem_id=f"{prefix}-stop-{key}")
    reveal = gr.Markdown(battles.reveal(Battle(anonymous=anonymous)), elem_id=f"{prefix}-reveal")
    vote_buttons: dict[str, gr.Button] = {}
    with gr.Row():
        for label, winner in VOTES.items():
            vote_buttons[label] = gr.Button(label, interactive=False, elem_id=_vote_id(prefix, winner))
    notice = gr.Markdown(elem_id=f"{prefix}-notice")
    if judge is not None and not anonymous:
        add_judge_panel(judge, state, service)
    with gr.Row():
        textbox = gr.Textbox(placeholder="Type a prompt for both models and press Enter", show_label=False,
                             scale=8, max_lines=12, elem_id=f"{prefix}-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{prefix}-send")
        stop_both = gr.Button("Stop", variant="stop", scale=1, interactive=False, elem_id=f"{prefix}-stop")
    with gr.Row():
        regenerate = gr.Button("🔄 Regenerate", elem_id=f"{prefix}-regenerate")
        reset = gr.Button("🎲 New round" if anonymous else "🗑️ Clear",
                          elem_id=f"{prefix}-{'new-round' if anonymous else 'clear'}")
    with gr.Accordion("Parameters", open=False):
        controls: dict[str, tuple] = {}
        if anonymous:
            gr.Markdown(ARENA_NOTE)
            controls["a"] = controls["b"] = sampling_controls(service, None)
            start = tuple(slider.value for slider in controls["a"])
        else:
            with gr.Row():
                for key in SIDES:
                    with gr.Column():
                        gr.Markdown(f"**{LABELS[key]}**")
                        controls[key] = sampling_controls(service, pickers[key].value)
    send_api = gr.Button(visible=False)     # the one-call *_send endpoint
    vote_choice = gr.Textbox(visible=False)  # the *_vote endpoint's input
    vote_api = gr.Button(visible=False)

    # -- views --------------------------------------------------------------------------------------
    def view(battle: Battle, extra: dict | None = None) -> dict:
        out = {chatbots[key]: render_exchanges(battle.side(key).exchanges) for key in SIDES}
        chosen = battle.vote_label
        out.update({button: gr.update(interactive=battle.can_vote,
                                      variant="primary" if label == chosen else "secondary")
                    for label, button in vote_buttons.items()})
        out.update({stops[key]: gr.update(interactive=battle.side(key).streaming) for key in SIDES})
        out[stop_both] = gr.update(interactive=any(battle.side(key).streaming for key in SIDES))
        out[reveal] = battles.reveal(battle)
        out.update(extra or {})
        return out

    outputs = [*chatbots.values(), *vote_buttons.values(), *stops.values(), stop_both, reveal, notice, textbox]

    def shown(battle: Battle, updates, text: str | None = None):
        """Views of a round's updates; a refused message goes back into the box."""
        for update in updates:
            extra = {notice: update.notice}
            if update.refused and text is not None:
                extra[textbox] = text
            yield view(battle, extra)

    # -- wiring: each mode's inputs -> one service call -------------------------------------------------
    def params_of(values) -> tuple | dict:
        """Slider values -> BattleService params: (t, p, n, r) for both sides (arena: None = each model's own
        default), or per side from the API order (t_a, p_a, n_a, t_b, p_b, n_b, r_a, r_b)."""
        if anonymous:
            return unless_at_start(values, start)
        return {"a": (*values[:3], values[6]), "b": (*values[3:6], values[7])}

    def show_message(text, battle: Battle):
        """Step one of Send: the message appears on both sides and the box empties."""
        text = text if isinstance(text, str) else ""
        pending = text if text.strip() and not battle.busy and battle.winner is None else None
        out = {chatbots[key]: render_exchanges(battle.side(key).exchanges, pending=pending) for key in SIDES}
        out.update({textbox: "", sent: text})
        return out

    def send_round(text, models, sliders, battle: Battle, request: gr.Request):
        updates = battles.send(battle, text, models=models, params=params_of(sliders),
                               client=client_hash(service, request))
        yield from shown(battle, updates, text)

    def regenerate_round(sliders, battle: Battle, request: gr.Request):
        updates = battles.regenerate(battle, params=params_of(sliders), client=client_hash(service, request))
        yield from shown(battle, updates)

    if anonymous:
        def send_fn(text, temperature, top_p, max_tokens, repetition_penalty, battle: Battle, request: gr.Request):
            yield from send_round(text, None, (temperature, top_p, max_tokens, repetition_penalty), battle, request)

        def regenerate_fn(temperature, top_p, max_tokens, repetition_penalty, battle: Battle, request: gr.Request):
            yield from regenerate_round((temperature, top_p, max_tokens, repetition_penalty), battle, request)
    else:
        def send_fn(text, model_a, model_b, temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b,
                    max_tokens_b, repetition_penalty_a, repetition_penalty_b, battle: Battle, request: gr.Request):
            sliders = (temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b, max_tokens_b,
                       repetition_penalty_a, repetition_penalty_b)
            yield from send_round(text, (model_a, model_b), sliders, battle, request)

        def regenerate_fn(temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b, max_tokens_b,
                          repetition_penalty_a, repetition_penalty_b, battle: Battle, request: gr.Request):
            sliders = (temperature_a, top_p_a, max_tokens_a, temperature_b, top_p_b, max_tokens_b,
                       repetition_penalty_a, repetition_penalty_b)
            yield from regenerate_round(sliders, battle, request)

    def vote_fn(choice, battle: Battle, request: gr.Request):
        message = battles.vote(battle, choice, client=client_hash(service, request))
        return view(battle, {notice: message})

    def stop_side(key: str | None):
        def stop(battle: Battle) -> None:
            battles.stop(battle, key)
        return stop

    def reset_battle(battle: Battle):
        battles.reset(battle)
        return view(battle, {notice: "", textbox: ""})

    def model_changed(battle: Battle):
        """Changing a model mid-conversation starts a new comparison (the vote must name who answered)."""
        return view(battle, {notice: battles.models_changed(battle)})

    slider_inputs = (list(controls["a"]) if anonymous else
                     [*controls["a"][:3], *controls["b"][:3], controls["a"][3], controls["b"][3]])
    model_inputs = [] if anonymous else [pickers["a"], pickers["b"]]
    common = dict(concurrency_id="generate", concurrency_limit="default")  # the --concurrency pool
    round_inputs = [*model_inputs, *slider_inputs, state]
    for trigger in (send.click, textbox.submit):
        trigger(show_message, [textbox, state], [*chatbots.values(), textbox, sent], api_name=False, queue=False) \
            .then(send_fn, [sent, *round_inputs], outputs, api_name=False, **common)
    send_api.click(_one_call(send_fn, textbox), [textbox, *round_inputs], outputs, api_name=f"{prefix}_send",
                   **common)
    regenerate.click(regenerate_fn, [*slider_inputs, state], outputs, api_name=f"{prefix}_regenerate", **common)
    vote_api.click(vote_fn, [vote_choice, state], outputs, api_name=f"{prefix}_vote")
    for label, button in vote_buttons.items():
        button.click(_fixed_vote(vote_fn, label), [state], outputs, api_name=False)
    for key in SIDES:
        stops[key].click(stop_side(key), [state], None, api_name=f"{prefix}_stop_{key}", queue=False)
    stop_both.click(stop_side(None), [state], None, api_name=f"{prefix}_stop", queue=False)
    reset.click(reset_battle, [state], outputs, api_name=f"{prefix}_{'new_round' if anonymous else 'clear'}",
                queue=False)
    for chatbot in chatbots.values():  # the pane's own 🗑 icon clears the battle, not just the display
        chatbot.clear(reset_battle, [state], outputs, api_name=False, queue=False)
    for key, picker in pickers.items():
        picker.change(model_changed, [state], outputs, api_name=False, queue=False)
        picker.change(functools.partial(follow_model, service), [picker], list(controls[key]), api_name=False,
                      queue=False)


def _one_call(send_fn, textbox):
    """``send_fn`` for API callers (same signature, so gradio injects the request): the box is cleared once
    the message is taken."""
    @functools.wraps(send_fn)
    def send_in_one_call(*args, **kwargs):
        for out in send_fn(*args, **kwargs):
            out.setdefault(textbox, "")
            yield out
    return send_in_one_call


def _fixed_vote(vote_fn, label: str):
    def vote_button(battle: Battle, request: gr.Request):
        return vote_fn(label, battle, request)
    return vote_button
