"""Conversation templates: chat messages -> the prompt string a model was trained on.

    from conversation_templates import get_template, list_templates, Template
    t = get_template("vicuna_v1.1")                  # or "vicuna_v0", "llama-2-chat", "chatml"
    t = get_template("chat_template", tokenizer=tok)  # the model's own jinja template
    prompt = t.render([{"role": "user", "content": "Hello"}])   # ends with "ASSISTANT:"
    t.stop_strings, t.system_message, t.name, t.neutralise(text)
    auto_template_name("lmsys/vicuna-7b-v1.5", has_chat_template=False)  # -> "vicuna_v1.1"

Injection safety: before rendering, every message content is neutralised. Each template
declares reserved strings (role markers such as `USER:`, separators such as `###`, special-token
texts such as `</s>`, `[INST]`, `<|im_start|>`); every occurrence of one in a message gets a
U+200B ZERO WIDTH SPACE after its first character (`</s>` -> `<\u200b/s>`), so text a user types
can neither forge a turn nor be tokenised as a special token. Matching is exact and
case-sensitive. See README.md beside this file.

A leaf package: it imports nothing from the app and has no UI code.
"""

from .model_specs import MODEL_SPECS, auto_template_name
from .neutralise import ZWSP
from .registry import get_template, list_templates
from .template import Template

__all__ = [
    "MODEL_SPECS",
    "ZWSP",
    "Template",
    "auto_template_name",
    "get_template",
    "list_templates",
]
