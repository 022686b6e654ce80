"""The single-chat tab: model dropdown, streaming chatbot, Send / Stop / Regenerate / Clear, system prompt,
sampling sliders, and a line under each reply with tokens, time to first token and tokens/s.

A visitor's conversation lives in ``gr.State`` (``ChatState``); the chatbot shows a rendering of it,
so the model's history never contains the UI's decorations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from ..services.chat import CancelToken, ChatService, TurnContext, new_id, sanitize_input
from .common import Turn, client_hash, render_turns, sampling_controls, turns_to_messages

CURSOR = "▌"


@dataclass
class ChatState:
    conversation_id: str = field(default_factory=new_id)
    turns: list[Turn] = field(default_factory=list)
    cancel: CancelToken = field(default_factory=CancelToken)
    turn_counter: int = 0


def build_chat_tab(service: ChatService, defaults) -> None:
    """Add the tab's components and events to the enclosing Blocks."""
    names = service.model_names()
    first = service.engine(names[0])
    state = gr.State(lambda: ChatState())
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="Model", scale=3, interactive=len(names) > 1)
    chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chatbot",
                         sanitize_html=True, render_markdown=True, buttons=["copy"])
    notice = gr.Markdown(visible=True, elem_id="chat-notice")
    with gr.Row():
        textbox = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                             elem_id="chat-input", max_lines=12)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
    with gr.Row():
        regenerate = gr.Button("🔄 Regenerate", elem_id="chat-regenerate")
        clear = gr.Button("🗑️ Clear", elem_id="chat-clear")
    with gr.Accordion("Parameters", open=False):
        system = gr.Textbox(value=first.default_system, label="System prompt", lines=3, elem_id="chat-system")
        temperature, top_p, max_tokens = sampling_controls(defaults, service.limits.max_new_tokens)

    def run(st: ChatState, model_name: str, system_text: str, temperature_v, top_p_v, max_v, request):
        """Stream the reply to the last turn (whose user text is set) and keep the state in step."""
        turn = st.turns[-1]
        params = service.params(temperature_v, top_p_v, max_v)
        engine_default = getattr(service.engines.get(model_name), "default_system", "")
        custom_system = system_text if system_text != engine_default else ""
        verdict = service.moderate([turn.user, custom_system])
        messages = turns_to_messages(st.turns, system_text)
        st.turn_counter += 1
        ctx = TurnContext(conversation_id=st.conversation_id, turn_index=st.turn_counter,
                          client_hash=client_hash(service, request))
        for update in service.reply(model_name, messages, params, verdict, ctx, st.cancel):
            turn.reply, turn.model = update.reply, model_name
            turn.notice = update.notice
            turn.in_context = update.status in ("done", "cancelled", "streaming") and bool(update.reply)
            # the statistics line; a reply stopped before its first token still says "0 tokens · stopped"
            shown = update.stats and (update.stats.n_tokens or update.status == "cancelled")
            turn.footer = update.stats.summary() if (update.done and shown) else ""
            cursor = "" if update.done else CURSOR
            yield render_turns(st.turns, cursor=cursor), st

    def respond(text, model_name, system_text, temperature_v, top_p_v, max_v, st: ChatState,
                request: gr.Request):
        text, system_text = sanitize_input(text), sanitize_input(system_text)
        problem = service.check_system(system_text) or service.check_message(text, len(st.turns),
                                                                               client_hash(service, request))
        if model_name not in service.engines:
            problem = f"Unknown model {model_name!r}; choose one of: {', '.join(service.engines)}."
        if problem:
            yield render_turns(st.turns), gr.update(), st, problem
            return
        st.turns.append(Turn(user=text))
        st.cancel.arm()  # before the cursor shows: a Stop pressed from then on is honoured
        yield render_turns(st.turns, cursor=CURSOR), "", st, ""
        for rendered, st in run(st, model_name, system_text, temperature_v, top_p_v, max_v, request):
            yield rendered, "", st, ""

    def regenerate_last(model_name, system_text, temperature_v, top_p_v, max_v, st: ChatState,
                        request: gr.Request):
        if not st.turns:
            yield render_turns(st.turns), st, "There is no reply to regenerate yet."
            return
        system_text = sanitize_input(system_text)
        problem = service.check_system(system_text) or service.check_message(
            st.turns[-1].user, len(st.turns) - 1, client_hash(service, request))
        if model_name not in service.engines:
            problem = f"Unknown model {model_name!r}; choose one of: {', '.join(service.engines)}."
        if problem:
            yield render_turns(st.turns), st, problem
            return
        st.turns[-1] = Turn(user=st.turns[-1].user)
        st.cancel.arm()
        for rendered, st in run(st, model_name, system_text, temperature_v, top_p_v, max_v, request):
            yield rendered, st, ""

    def stop_reply(st: ChatState):
        st.cancel.cancel()

    def clear_chat(st: ChatState):
        st.cancel.cancel()
        fresh = ChatState()
        return [], fresh, ""

    def model_changed(model_name, system_text, st: ChatState):
        """Switching models switches the default system prompt, unless the visitor edited it."""
        defaults_by_model = {n: getattr(e, "default_system", "") for n, e in service.engines.items()}
        if system_text in defaults_by_model.values() or not system_text.strip():
            return defaults_by_model.get(model_name, system_text)
        return system_text

    inputs = [textbox, model, system, temperature, top_p, max_tokens, state]
    # One pool for every event that generates, sized by --concurrency (queue(default_concurrency_limit=...)).
    # concurrency_limit=None would mean "unlimited" for the whole pool in gradio 6; "default" takes the queue's.
    common = dict(concurrency_id="generate", concurrency_limit="default")
    send.click(respond, inputs, [chatbot, textbox, state, notice], api_name="chat", **common)
    textbox.submit(respond, inputs, [chatbot, textbox, state, notice], api_name=False, **common)
    regenerate.click(regenerate_last, inputs[1:], [chatbot, state, notice], api_name="regenerate", **common)
    stop.click(stop_reply, [state], None, api_name="stop", queue=False)
    clear.click(clear_chat, [state], [chatbot, state, notice], api_name="clear", queue=False)
    model.change(model_changed, [model, system, state], [system], api_name=False, queue=False)
