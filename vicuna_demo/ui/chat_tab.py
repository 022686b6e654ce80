"""The single-chat tab: model dropdown, streaming chatbot, Send / Stop / Regenerate / Clear, system prompt,
sampling sliders, a line under each reply with tokens, time to first token and tokens/s, and example
prompts on an empty chat (clicking one sends it). A visitor's message can be edited in place (✏️): the
conversation is cut after it and answered again (``ChatService.edit``).

Rendering only: each event is one call into ``ChatService`` (turn, regenerate, stop, clear) with the
visitor's ``ChatSession`` (in ``gr.State``), and the chatbot shows a rendering of that session.

Send and Enter are gradio's two-step event: ``show_message`` (not queued) shows the message and clears
the box at once, then ``.then(reply)`` streams the service's turn; a refused message (busy, a limit)
goes back into the box with the reason. gradio_client does not follow ``.then`` chains, so ``/chat``
is a separate one-call endpoint running the same service call. API: /chat, /regenerate, /stop, /clear.

The sliders show the selected model's defaults and go back to them when the model changes (ui/sampling.py);
/chat and /regenerate take (…, temperature, top_p, max_tokens, repetition_penalty), the last one new: a
caller that leaves it out gets the slider's starting value.
"""

from __future__ import annotations

import gradio as gr

from ..services.chat import ChatService, ChatSession, TurnUpdate
from ..services.session import BUSY_NOTICE
from .common import client_hash, exchange_of, render_exchanges
from .sampling import follow_model, sampling_controls


# Shown on an empty chat; clicking one sends it (as typed text: checked and moderated like any message).
EXAMPLE_PROMPTS = (
    "Explain quantum computing in simple terms.",
    "Write a haiku about the sea.",
    "Give me three ideas for a rainy weekend.",
    "What is the difference between a list and a tuple in Python?",
)


def build_chat_tab(service: ChatService) -> None:
    """Add the tab's components and events to the enclosing Blocks."""
    names = service.model_names()
    state = gr.State(lambda: ChatSession())
    sent = gr.State("")  # the message between the two steps of Send
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="Model", scale=3, interactive=len(names) > 1)
    chatbot = gr.Chatbot(label="Conversation", show_label=False, height=480, elem_id="chatbot",
                         sanitize_html=True, render_markdown=True, buttons=["copy"],
                         examples=[{"text": text} for text in EXAMPLE_PROMPTS], editable="user")
    notice = gr.Markdown(visible=True, elem_id="chat-notice")
    with gr.Row():
        textbox = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                             elem_id="chat-input", max_lines=12)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop", interactive=False)
    with gr.Row():
        regenerate = gr.Button("🔄 Regenerate", elem_id="chat-regenerate")
        clear = gr.Button("🗑️ Clear", elem_id="chat-clear")
    with gr.Accordion("Parameters", open=False):
        system = gr.Textbox(value=service.default_system(names[0]), label="System prompt", lines=3,
                            elem_id="chat-system")
        sliders = sampling_controls(service, names[0])
    chat_api = gr.Button(visible=False)  # the one-call /chat endpoint

    def view(session: ChatSession, update: TurnUpdate, text: str | None = None) -> dict:
        """The page after ``update``. A refused message goes back into the box (``text``)."""
        out = {chatbot: render_exchanges(session.exchanges), notice: ""}
        if update.status == "refused":
            out[notice] = update.notice
            if text is not None:
                out[textbox] = text
            # Stop stays lit only if another event of this visitor is still generating
            out[stop] = gr.update(interactive=update.notice == BUSY_NOTICE)
        else:
            out[stop] = gr.update(interactive=not update.done)
        return out

    def show_message(text, session: ChatSession):
        """Step one of Send: the message appears, the box empties (the service checks it in step two)."""
        text = text if isinstance(text, str) else ""
        shown = text if text.strip() and not session.busy else None
        return {textbox: "", sent: text, chatbot: render_exchanges(session.exchanges, pending=shown)}

    def show_example(session: ChatSession, choice: gr.SelectData):
        """An example prompt clicked on the empty chat: step one of Send with its text."""
        value = choice.value if isinstance(choice.value, dict) else {}
        return show_message(value.get("text", ""), session)

    def reply(text, model_name, system_text, temperature_v, top_p_v, max_v, penalty_v, session: ChatSession,
              request: gr.Request):
        for update in service.turn(session, text, model=model_name, system=system_text, temperature=temperature_v,
                                   top_p=top_p_v, max_new_tokens=max_v, repetition_penalty=penalty_v,
                                   client=client_hash(service, request)):
            yield view(session, update, text)

    def chat_in_one_call(text, model_name, system_text, temperature_v, top_p_v, max_v, penalty_v,
                         session: ChatSession, request: gr.Request):
        """/chat for API callers: the same service call, the box cleared once the message is taken."""
        for out in reply(text, model_name, system_text, temperature_v, top_p_v, max_v, penalty_v, session, request):
            out.setdefault(textbox, "")
            del out[stop]
            yield out

    def regenerate_last(model_name, system_text, temperature_v, top_p_v, max_v, penalty_v, session: ChatSession,
                        request: gr.Request):
        for update in service.regenerate(session, model=model_name, system=system_text, temperature=temperature_v,
                                         top_p=top_p_v, max_new_tokens=max_v, repetition_penalty=penalty_v,
                                         client=client_hash(service, request)):
            yield view(session, update)

    def edit_message(model_name, system_text, temperature_v, top_p_v, max_v, penalty_v, session: ChatSession,
                     edited: gr.EditData, request: gr.Request):
        """A message edited in the chatbot (✏️): the conversation is cut after it and the reply regenerated."""
        index = exchange_of(session.exchanges, edited.index)
        for update in service.edit(session, -1 if index is None else index, edited.value, model=model_name,
                                   system=system_text, temperature=temperature_v, top_p=top_p_v,
                                   max_new_tokens=max_v, repetition_penalty=penalty_v,
                                   client=client_hash(service, request)):
            yield view(session, update)

    def stop_reply(session: ChatSession):
        service.stop(session)

    def clear_chat(session: ChatSession):
        fresh = service.clear(session)
        return {chatbot: [], state: fresh, notice: "", stop: gr.update(interactive=False)}

    def model_changed(model_name, system_text):
        """Switching models switches the default system prompt, unless the visitor edited it, and puts the sliders
        at the new model's defaults."""
        defaults = {name: service.default_system(name) for name in names}
        if system_text in defaults.values() or not system_text.strip():
            system_text = defaults.get(model_name, system_text)
        return [system_text, *follow_model(service, model_name)]

    params = [model, system, *sliders, state]
    # One pool for every event that generates, sized by --concurrency (queue(default_concurrency_limit=...)).
    # concurrency_limit=None would mean "unlimited" for the whole pool in gradio 6; "default" takes the queue's.
    common = dict(concurrency_id="generate", concurrency_limit="default")
    for trigger in (send.click, textbox.submit):
        trigger(show_message, [textbox, state], [textbox, sent, chatbot], api_name=False, queue=False) \
            .then(reply, [sent, *params], [chatbot, textbox, notice, stop], api_name=False, **common)
    chatbot.example_select(show_example, [state], [textbox, sent, chatbot], api_name=False, queue=False) \
        .then(reply, [sent, *params], [chatbot, textbox, notice, stop], api_name=False, **common)
    chat_api.click(chat_in_one_call, [textbox, *params], [chatbot, textbox, notice], api_name="chat", **common)
    regenerate.click(regenerate_last, params, [chatbot, notice, stop], api_name="regenerate", **common)
    chatbot.edit(edit_message, params, [chatbot, notice, stop], api_name=False, **common)
    stop.click(stop_reply, [state], None, api_name="stop", queue=False)
    clear.click(clear_chat, [state], [chatbot, state, notice, stop], api_name="clear", queue=False)
    # the chatbot's own 🗑 icon: the same reset, so the screen and the service never disagree
    chatbot.clear(clear_chat, [state], [chatbot, state, notice, stop], api_name=False, queue=False)
    model.change(model_changed, [model, system], [system, *sliders], api_name=False, queue=False)
