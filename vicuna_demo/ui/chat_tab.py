"""The single-chat tab: model dropdown, streaming chatbot, Send / Stop / Regenerate / Clear, system prompt,
sampling sliders, a line under each reply with tokens, time to first token and tokens/s, and example
prompts on an empty chat (clicking one sends it). A visitor's message can be edited in place (✏️): the
conversation is cut after it and answered again (``ChatService.edit``). A page reload finds the conversation
again: the browser keeps only its resume key (``gr.BrowserState``), the text stays in ``ChatService.kept``;
⬇️ JSON / ⬇️ Markdown download what the service holds (services/transcript.py).

Rendering only: each event is one call into ``ChatService`` (turn, regenerate, stop, clear) with the
visitor's ``ChatSession`` (in ``gr.State``), and the chatbot shows a rendering of that session.

Send and Enter are gradio's two-step event: ``show_message`` (not queued) shows the message and clears
the box at once, then ``.then(reply)`` streams the service's turn; a refused message (busy, a limit)
goes back into the box with the reason. gradio_client does not follow ``.then`` chains, so ``/chat``
is a separate one-call endpoint running the same service call. API: /chat, /regenerate, /continue, /stop,
/clear. ⏩ Continue shows after a reply cut at the token limit: the model goes on with the same reply.

The sliders show the selected model's defaults and go back to them when the model changes (ui/sampling.py);
/chat and /regenerate take (…, temperature, top_p, max_tokens, repetition_penalty), the last one new: a
caller that leaves it out gets the slider's starting value.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from ..services.chat import ChatService, ChatSession, TurnUpdate
from ..services.session import BUSY_NOTICE
from ..services.transcript import as_json, as_markdown
from .common import client_hash, exchange_of, render_exchanges
from .sampling import follow_model, sampling_controls


# Shown on an empty chat; clicking one sends it (as typed text: checked and moderated like any message).
EXAMPLE_PROMPTS = (
    "Explain quantum computing in simple terms.",
    "Write a haiku about the sea.",
    "Give me three ideas for a rainy weekend.",
    "What is the difference between a list and a tuple in Python?",
)


def build_chat_tab(service: ChatService, demo: gr.Blocks) -> None:
    """Add the tab's components and events to the enclosing Blocks (``demo``: for its page-load event)."""
    names = service.model_names()
    state = gr.State(lambda: ChatSession())
    # the browser keeps only the conversation's resume key (ChatService.resume); the text stays on the server
    resume_key = gr.BrowserState("")
    downloads = Path(tempfile.mkdtemp(prefix="vicuna-chat-"))
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
        go_on = gr.Button("⏩ Continue", visible=False, elem_id="chat-continue")  # after a reply cut at the limit
        clear = gr.Button("🗑️ Clear", elem_id="chat-clear")
        as_json_file = gr.DownloadButton("⬇️ JSON", interactive=False, elem_id="chat-download-json")
        as_markdown_file = gr.DownloadButton("⬇️ Markdown", interactive=False, elem_id="chat-download-md")
    with gr.Accordion("Parameters", open=False):
        system = gr.Textbox(value=service.default_system(names[0]), label="System prompt", lines=3,
                            elem_id="chat-system")
        sliders = sampling_controls(service, names[0])
    chat_api = gr.Button(visible=False)  # the one-call /chat endpoint

    def saved(session: ChatSession) -> dict:
        """After each event: the browser's resume key, and the download buttons (the conversation the service
        holds, as JSON and as Markdown). Chained with ``.then``, so the API's outputs stay as they were."""
        cut = service.can_continue(session)
        if not session.exchanges:
            return {resume_key: session.resume_key, go_on: gr.update(visible=False),
                    **{button: gr.update(value=None, interactive=False) for button in (as_json_file, as_markdown_file)}}
        folder = downloads / session.conversation_id
        folder.mkdir(exist_ok=True)
        (folder / "conversation.json").write_text(as_json(session.exchanges, session.conversation_id), "utf-8")
        (folder / "conversation.md").write_text(as_markdown(session.exchanges), "utf-8")
        return {resume_key: session.resume_key, go_on: gr.update(visible=cut),
                as_json_file: gr.update(value=str(folder / "conversation.json"), interactive=True),
                as_markdown_file: gr.update(value=str(folder / "conversation.md"), interactive=True)}

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
        out = {textbox: "", sent: text, chatbot: render_exchanges(session.exchanges, pending=shown)}
        if shown:
            out[go_on] = gr.update(visible=False)   # a new message: the cut reply is no longer the last one
        return out

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

    def continue_last(system_text, temperature_v, top_p_v, max_v, penalty_v, session: ChatSession,
                      request: gr.Request):
        """⏩ Continue: the model that wrote the last reply goes on with it (it was cut at the token limit)."""
        for update in service.continue_reply(session, system=system_text, temperature=temperature_v, top_p=top_p_v,
                                             max_new_tokens=max_v, repetition_penalty=penalty_v,
                                             client=client_hash(service, request)):
            yield view(session, update)

    def stop_reply(session: ChatSession):
        service.stop(session)

    def clear_chat(session: ChatSession):
        fresh = service.clear(session)
        return {chatbot: [], state: fresh, notice: "", stop: gr.update(interactive=False)}

    def restore(key, session: ChatSession):
        """Page load: the conversation this browser had (by its key), else this page's new one."""
        session = service.resume(key, session)
        return {state: session, chatbot: render_exchanges(session.exchanges), stop: gr.update(interactive=session.busy),
                **saved(session)}

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
    after = [resume_key, go_on, as_json_file, as_markdown_file]
    for trigger in (send.click, textbox.submit):
        trigger(show_message, [textbox, state], [textbox, sent, chatbot, go_on], api_name=False, queue=False) \
            .then(reply, [sent, *params], [chatbot, textbox, notice, stop], api_name=False, **common) \
            .then(saved, [state], after, api_name=False, queue=False)
    chatbot.example_select(show_example, [state], [textbox, sent, chatbot, go_on], api_name=False, queue=False) \
        .then(reply, [sent, *params], [chatbot, textbox, notice, stop], api_name=False, **common) \
        .then(saved, [state], after, api_name=False, queue=False)
    chat_api.click(chat_in_one_call, [textbox, *params], [chatbot, textbox, notice], api_name="chat", **common)
    regenerate.click(regenerate_last, params, [chatbot, notice, stop], api_name="regenerate", **common) \
        .then(saved, [state], after, api_name=False, queue=False)
    go_on.click(continue_last, [system, *sliders, state], [chatbot, notice, stop], api_name="continue", **common) \
        .then(saved, [state], after, api_name=False, queue=False)
    chatbot.edit(edit_message, params, [chatbot, notice, stop], api_name=False, **common) \
        .then(saved, [state], after, api_name=False, queue=False)
    stop.click(stop_reply, [state], None, api_name="stop", queue=False)
    clear.click(clear_chat, [state], [chatbot, state, notice, stop], api_name="clear", queue=False) \
        .then(saved, [state], after, api_name=False, queue=False)
    # the chatbot's own 🗑 icon: the same reset, so the screen and the service never disagree
    chatbot.clear(clear_chat, [state], [chatbot, state, notice, stop], api_name=False, queue=False) \
        .then(saved, [state], after, api_name=False, queue=False)
    demo.load(restore, [resume_key, state], [state, chatbot, stop, *after], api_name=False, queue=False)
    model.change(model_changed, [model, system], [system, *sliders], api_name=False, queue=False)
