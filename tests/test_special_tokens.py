"""No typed text becomes a special token: every template, with the embedded SmolLM2 tokenizer and with a
Llama-style tokenizer built here (SentencePiece-like BPE with `<s>`/`</s>` special and `[INST]`/`[/INST]`
as non-special added tokens), offline.

The prompt ids come from the app's own encoder (``PromptEncoder`` / ``PromptingModel``). Each test has
teeth: the hostile text, tokenised as a plain string, does produce token ids.
"""

from __future__ import annotations

import json
import types
from collections import Counter

import pytest

from conversation_templates import control_tokens, get_template
from vicuna_demo.engines.prompting import PromptEncoder, PromptingModel
from vicuna_demo.engines.protocol import SamplingParams

TEMPLATES = ("vicuna_v1.1", "vicuna_v0", "llama-2-chat", "chatml", "chat_template")
TYPED = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>",
         "<</SYS>>", "USER:", "ASSISTANT:", "### Human:")

# A Llama-2-like chat template of our own for the fixture tokenizer (the `chat_template` case).
LLAMA_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[INST] <<SYS>>\n{{ m['content'] | trim }}\n<</SYS>>\n\n"
    "{% elif m['role'] == 'user' %}{% if loop.index0 > 0 and messages[0]['role'] != 'system' or loop.index0 > 1 %}"
    "[INST] {% elif messages[0]['role'] != 'system' %}[INST] {% endif %}{{ m['content'] | trim }} [/INST]"
    "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """A small Llama-style tokenizer trained here, saved and loaded back with AutoTokenizer (no network)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    corpus = ["A chat between a curious user and an artificial intelligence assistant.",
              "USER: Hello ASSISTANT: Hi there! What is 2+2? The answer is four.",
              "### Human: Got any creative ideas for a birthday? ### Assistant: Of course, here are some.",
              "You are a pirate. Tags like <s> or </s> and [INST] are ordinary text here."] * 20
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    saved = json.loads(trained.to_str())["model"]
    vocab = dict(saved["vocab"])
    for byte in range(256):  # byte fallback pieces are ordinary vocabulary entries, as in Llama's
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved["merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.pre_tokenizer = trained.pre_tokenizer
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_tokens([AddedToken("[INST]", normalized=False, special=False),
                        AddedToken("[/INST]", normalized=False, special=False)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    path = tmp_path_factory.mktemp("llama-style-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            chat_template=LLAMA_JINJA).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id  # it adds BOS, as Llama's does
    assert not tokenizer.added_tokens_decoder[tokenizer.convert_tokens_to_ids("[INST]")].special
    return tokenizer


@pytest.fixture(params=["smollm2", "llama"])
def tokenizer(request, embedded_tokenizer, llama_tokenizer):
    return embedded_tokenizer if request.param == "smollm2" else llama_tokenizer


def conversation(text: str) -> list[dict]:
    """System, user, assistant, user: every content carries `text`."""
    return [{"role": "system", "content": f"Be brief. {text}"}, {"role": "user", "content": f"Hi {text} there"},
            {"role": "assistant", "content": f"{text}Hello{text}"}, {"role": "user", "content": text}]


def typed_texts(tokenizer) -> list[str]:
    """What a hostile visitor types: template markers of every kind and every added token of the tokenizer."""
    return sorted({*TYPED, *control_tokens(tokenizer)})


def hostile_text(tokenizer) -> str:
    return " ".join(typed_texts(tokenizer))


def token_counts(encoder: PromptEncoder, ids) -> Counter:
    return Counter(i for i in ids if i in encoder.token_ids)


def test_added_tokens_of_both_tokenizers_include_non_special_ones(embedded_tokenizer, llama_tokenizer):
    """What the encoder must treat as tokens: every added token, special or not."""
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"} <= set(control_tokens(embedded_tokenizer))
    assert {"<s>", "</s>", "<unk>", "[INST]", "[/INST]"} <= set(control_tokens(llama_tokenizer))


def test_split_special_tokens_leaves_non_special_added_tokens_whole_on_a_fast_tokenizer(llama_tokenizer):
    """Why the encoder does not rely on split_special_tokens alone (transformers 5.24, fast tokenizer)."""
    inst = llama_tokenizer.convert_tokens_to_ids("[INST]")
    eos = llama_tokenizer.eos_token_id
    split = llama_tokenizer("[INST] hi </s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert inst in split and eos not in split
    assert not {inst, eos} & set(PromptEncoder(llama_tokenizer).encode([("[INST] hi </s>", True)]))


@pytest.mark.parametrize("name", TEMPLATES)
def test_typed_token_texts_never_become_token_ids(tokenizer, name):
    template = get_template(name, tokenizer=tokenizer)
    encoder = PromptEncoder(tokenizer)
    hostile = hostile_text(tokenizer)
    assert token_counts(encoder, tokenizer(hostile, add_special_tokens=False)["input_ids"])  # the test has teeth
    attacked = encoder.encode(template.segments(conversation(hostile), encoder.control))
    genuine = encoder.encode(template.segments(conversation("ok"), encoder.control))
    assert token_counts(encoder, attacked) == token_counts(encoder, genuine)


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_without_typed_tokens_gets_the_ids_of_the_whole_string(tokenizer, name):
    """Segment encoding changes nothing for ordinary text: the ids are those of tokenizer(prompt)."""
    template = get_template(name, tokenizer=tokenizer)
    encoder = PromptEncoder(tokenizer)
    messages = conversation("What is 2+2? Tell me about ### and USER: please.")
    prompt = template.render(messages)
    bos = tokenizer.bos_token
    expected = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    assert encoder.encode(template.segments(messages, encoder.control)) == expected


@pytest.mark.parametrize(("tokenizer_name", "name", "marker", "count"), [
    ("smollm2", "chatml", "<|im_start|>", 5), ("smollm2", "chatml", "<|im_end|>", 4),
    ("smollm2", "chat_template", "<|im_start|>", 5), ("smollm2", "chat_template", "<|im_end|>", 4),
    ("llama", "vicuna_v1.1", "</s>", 1), ("llama", "vicuna_v1.1", "<s>", 1),
    ("llama", "llama-2-chat", "[INST]", 2), ("llama", "llama-2-chat", "[/INST]", 2),
    ("llama", "llama-2-chat", "</s>", 1), ("llama", "chat_template", "[/INST]", 2),
    ("llama", "chat_template", "</s>", 1),
])
def test_the_templates_own_markers_still_become_token_ids(embedded_tokenizer, llama_tokenizer, tokenizer_name,
                                                          name, marker, count):
    tokenizer = embedded_tokenizer if tokenizer_name == "smollm2" else llama_tokenizer
    template = get_template(name, tokenizer=tokenizer)
    encoder = PromptEncoder(tokenizer)
    ids = encoder.encode(template.segments(conversation(hostile_text(tokenizer)), encoder.control))
    assert ids.count(tokenizer.convert_tokens_to_ids(marker)) == count


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_typed_fragment_cannot_join_the_template_text_into_a_token(tokenizer, name):
    """Every prefix and suffix of every token text, at both edges of a message: no token across the seam."""
    template = get_template(name, tokenizer=tokenizer)
    encoder = PromptEncoder(tokenizer)
    genuine = token_counts(encoder, encoder.encode(template.segments(conversation("ok"), encoder.control)))
    for text in typed_texts(tokenizer):
        for cut in range(1, len(text)):
            for fragment in (text[:cut], text[cut:]):
                ids = encoder.encode(template.segments(conversation(fragment), encoder.control))
                assert token_counts(encoder, ids) == genuine, (text, fragment)


def test_prepare_counts_the_real_ids_and_keeps_typed_tokens_as_text(embedded_tokenizer):
    """PromptingModel (what LocalEngine and ZeroGPUEngine use) fits the context on the ids it sends."""
    loaded = types.SimpleNamespace(name="Smol", template=get_template("vicuna_v1.1"), context_window=512,
                                   tokenizer=embedded_tokenizer, model=None, eos_token_ids=(2,), sampling={},
                                   device="cpu")
    model = PromptingModel(loaded)
    typed = "<|im_end|>" * 40  # 40 tokens if parsed as tokens, far more as text
    prompt = model.prepare([{"role": "user", "content": typed}], SamplingParams(max_new_tokens=64))
    assert prompt.n_prompt_tokens == len(prompt.payload)
    assert 2 not in prompt.payload and 1 not in prompt.payload  # no <|im_end|> / <|im_start|> id
    assert len(prompt.payload) > 40 * 5


def test_a_token_the_vocabulary_spells_from_text_is_broken_with_a_zero_width_space(llama_tokenizer):
    """If plain-text encoding of a typed token still gives its id, the encoder spells it with U+200B instead."""
    import copy
    tokenizer = copy.deepcopy(llama_tokenizer)
    word = "\u2581assistant"  # a whole piece of the trained vocabulary...
    tokenizer.add_tokens([word])  # ...now also an added token, with the same id
    token = tokenizer.convert_tokens_to_ids(word)
    assert tokenizer._encode_without_added_tokens(word) == [token]  # the test has teeth
    encoder = PromptEncoder(tokenizer)
    assert token not in encoder.encode([(word, True)])
    assert token not in encoder.encode([("Say ", False), (word, True)])
