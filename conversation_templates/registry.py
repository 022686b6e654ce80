"""Looking templates up by name: `get_template` and `list_templates`.

The named templates are constants built once at import; the registry is a read-only mapping.
`chat_template` is built per call from the tokenizer passed in.
"""

from types import MappingProxyType

from .chatml import CHATML
from .llama2 import LLAMA_2_CHAT
from .template import Template
from .tokenizer_template import NAME as CHAT_TEMPLATE
from .tokenizer_template import from_tokenizer
from .vicuna import VICUNA_V0, VICUNA_V1_1

TEMPLATES = MappingProxyType({t.name: t for t in (VICUNA_V1_1, VICUNA_V0, LLAMA_2_CHAT, CHATML)})


def list_templates() -> list[str]:
    """Every name `get_template` accepts."""
    return [*TEMPLATES, CHAT_TEMPLATE]


def get_template(name: str, tokenizer=None) -> Template:
    """The template called `name`; `chat_template` needs the model's `tokenizer`.

    Raises ValueError for an unknown name (listing the known ones), and for `chat_template`
    without a tokenizer or with a tokenizer that has no chat template.
    """
    if name == CHAT_TEMPLATE:
        return from_tokenizer(tokenizer)
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known templates: {', '.join(list_templates())}")
    return TEMPLATES[name]
