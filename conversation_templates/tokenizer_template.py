"""The `chat_template` template: the model's own jinja chat template, via its tokenizer.

Rendering calls `tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=...)`, asking for the generation prompt (the open assistant slot) when
the user spoke last, as every other template here does.

What the other templates declare by hand is derived here:
- reserved strings: the text of every special or added token of the tokenizer, plus the
  template's own markers seen in a rendered probe conversation (whitespace-separated fragments
  of the template-owned text, special tokens cut out, that contain a non-alphanumeric
  character, e.g. `USER:` or `[/INST]`; bare words like `user` are left alone);
- stop strings: the eos token's text, plus the end-of-turn marker the template writes right
  after an assistant message (e.g. `<|im_end|>`, `<end_of_turn>`, `</s>`).
The default system prompt is whatever the jinja template adds itself when none is given, so
`system_message` is "".
"""

import re
from collections.abc import Sequence

from .messages import RoleContent
from .template import Template

NAME = "chat_template"

_PROBES = {"system": "Qz0probe", "user": "Qz1probe", "assistant": "Qz2probe", "user2": "Qz3probe"}


def _apply(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The text of every special and added token, whitespace-only ones left out."""
    texts = list(getattr(tokenizer, "all_special_tokens", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts += [getattr(token, "content", str(token)) for token in decoder.values()]
    kept = (text for text in texts if isinstance(text, str) and len(text) >= 2 and text.strip())
    return tuple(dict.fromkeys(kept))


def _probe_pieces(tokenizer) -> list[str]:
    """Template-owned text between the probe contents, or [] if no probe rendered."""
    user, assistant, user2 = (
        {"role": "user", "content": _PROBES["user"]},
        {"role": "assistant", "content": _PROBES["assistant"]},
        {"role": "user", "content": _PROBES["user2"]},
    )
    system = {"role": "system", "content": _PROBES["system"]}
    for conversation in ([system, user, assistant, user2], [user, assistant, user2]):
        try:
            text = _apply(tokenizer, conversation, add_generation_prompt=True)
        except Exception:  # some templates refuse a system role; try without one
            continue
        pieces, position = [], 0
        for message in conversation:
            found = text.find(message["content"], position)
            if found < 0:
                break
            pieces.append(text[position:found])
            position = found + len(message["content"])
        else:
            return [*pieces, text[position:]]
    return []


def _marker_fragments(piece: str, specials: Sequence[str]) -> list[str]:
    if specials:
        piece = re.sub("|".join(re.escape(s) for s in specials), " ", piece)
    return [f for f in piece.split() if len(f) >= 2 and not f.isalnum()]


def _end_of_turn_marker(after_assistant: str, specials: Sequence[str]) -> str | None:
    stripped = after_assistant.lstrip()
    for special in sorted(specials, key=len, reverse=True):
        if stripped.startswith(special):
            return special
    fragments = _marker_fragments(stripped, specials)
    return fragments[0] if fragments else None


def from_tokenizer(tokenizer) -> Template:
    """Build the `chat_template` template for `tokenizer`; ValueError if it has none."""
    if tokenizer is None:
        raise ValueError("template 'chat_template' needs the model's tokenizer: pass tokenizer=")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; "
            "choose a named template instead (e.g. 'vicuna_v1.1')"
        )
    specials = special_token_texts(tokenizer)
    pieces = _probe_pieces(tokenizer)
    markers = [f for piece in pieces for f in _marker_fragments(piece, specials)]
    end_marker = _end_of_turn_marker(pieces[-2], specials) if pieces else None
    eos = getattr(tokenizer, "eos_token", None)
    stops = [s for s in (eos, end_marker) if isinstance(s, str) and s]

    def format_with_tokenizer(system: str | None, turns: Sequence[RoleContent]) -> str:
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages += [{"role": role, "content": content} for role, content in turns]
        return _apply(tokenizer, messages, add_generation_prompt=turns[-1][0] == "user")

    return Template(
        name=NAME,
        system_message="",
        stop_strings=tuple(dict.fromkeys(stops)),
        reserved=tuple(dict.fromkeys([*specials, *markers])),
        format=format_with_tokenizer,
    )
