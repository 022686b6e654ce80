"""Conversation templates: chat messages -> the prompt a model was trained on.

    from conversation_templates import get_template, list_templates, Template
    t = get_template("vicuna_v1.1")                  # or "vicuna_v0", "llama-2-chat", "chatml"
    t = get_template("chat_template", tokenizer=tok)  # the model's own jinja template
    prompt = t.render([{"role": "user", "content": "Hello"}])   # ends with "ASSISTANT:"
    pieces = t.segments(messages, control_pattern(control_tokens(tok)))  # for encoding, see below
    t.stop_strings, t.system_message, t.name, t.neutralise(text)
    auto_template_name("lmsys/vicuna-7b-v1.5", has_chat_template=False)  # -> "vicuna_v1.1"

Injection safety, in two layers (see README.md beside this file):
- Text: each template declares reserved strings (role markers such as `USER:`, separators such
  as `###`, marker texts such as `</s>`, `[INST]`, `<|im_start|>`); every occurrence of one in
  a message gets a U+200B ZERO WIDTH SPACE after its first character (`USER:` ->
  `U\u200bSER:`), so typed text cannot forge a turn as text.
- Tokens: `segments` cuts out every text of one of the tokenizer's added tokens that a caller
  typed (`marking.py`); the encoder (vicuna_demo.engines.prompting) tokenises those with the
  tokenizer's special-token parsing off, so only the template's own markers become special ids,
  whatever the template and the tokenizer.

A leaf package: it imports nothing from the app and has no UI code.
"""

from .marking import control_pattern, control_tokens
from .neutralise import ZWSP
from .registry import get_template, list_templates
from .template import Segment, Template
from .template_rules import TEMPLATE_RULES, auto_template_name

__all__ = [
    "TEMPLATE_RULES",
    "ZWSP",
    "Segment",
    "Template",
    "auto_template_name",
    "control_pattern",
    "control_tokens",
    "get_template",
    "list_templates",
]
