"""Which template a model gets by default: one ordered table of model-id patterns.

`auto_template_name(model_id, has_chat_template)` returns the template of the first row whose
pattern matches anywhere in the model id (a Hub id, a local folder or a GGUF file name; case is
ignored). With no row matching it returns `chat_template` when the tokenizer has one, else
`vicuna_v1.1`. To support another model family, add a row here; nothing else chooses by name.
"""

import re

# (pattern, template name), first match wins: more specific rows first.
TEMPLATE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), template)
    for pattern, template in (
        (r"vicuna.*v1[._-]?[135](?![0-9])", "vicuna_v1.1"),
        (r"vicuna.*v0(?![0-9.])", "vicuna_v0"),
        (r"llama[-_ ]?2[-_ ].*chat", "llama-2-chat"),
    )
)

FALLBACK_WITH_CHAT_TEMPLATE = "chat_template"
FALLBACK_WITHOUT_CHAT_TEMPLATE = "vicuna_v1.1"


def auto_template_name(model_id: str, has_chat_template: bool) -> str:
    """The template name for `model_id` (see the module docstring)."""
    for pattern, template in TEMPLATE_RULES:
        if pattern.search(model_id):
            return template
    return FALLBACK_WITH_CHAT_TEMPLATE if has_chat_template else FALLBACK_WITHOUT_CHAT_TEMPLATE
