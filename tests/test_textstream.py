"""Token ids -> text deltas (vicuna_demo/engines/textstream.py).

StopFilter is checked exhaustively: every way of cutting a text into chunks, with stop strings that
overlap, repeat their own prefixes, or never complete. At every step the text emitted so far must be
a prefix of the right final answer (the text up to the first stop string), so a partial stop string
can never be shown and later taken back. IncrementalDecoder is checked with the embedded SmolLM2's
real tokenizer on emoji, CJK and accented text whose characters are split across byte-level tokens:
no delta may contain U+FFFD, and the deltas add up to the tokenizer's own decoding.
"""

from __future__ import annotations

import itertools
import random

import pytest

from vicuna_demo.engines.textstream import IncrementalDecoder, StopFilter

REPLACEMENT = "\ufffd"


def expected_output(text: str, stops) -> tuple[str, bool]:
    """The text up to the earliest stop string, and whether one occurs."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def chunkings(text: str):
    """Every way to cut ``text`` into non-empty consecutive chunks (2 ** (len - 1) of them)."""
    for cuts in itertools.product((False, True), repeat=max(len(text) - 1, 0)):
        chunks, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                chunks.append(text[start:i])
                start = i
        chunks.append(text[start:])
        yield chunks


def run_filter(stops, chunks):
    """Feed the chunks; check the no-leak property at every step; -> (output, stopped)."""
    flt = StopFilter(stops)
    want, _ = expected_output("".join(chunks), stops)
    shown = ""
    for chunk in chunks:
        shown += flt.push(chunk)
        assert want.startswith(shown), f"leaked {shown!r} (final answer {want!r}) for chunks {chunks}"
    shown += flt.flush()
    return shown, flt.stopped


CASES = [
    # (text, stop strings)
    ("Hi USER: x", ["USER:"]),
    ("aaab", ["aab"]),                         # the stop's own prefix repeats before it
    ("xabcd", ["abc", "bcd"]),                 # overlapping stops: the earliest wins
    ("xbcdabc", ["abc", "bcd"]),
    ("end###tail", ["###", "</s>"]),
    ("no </ s<s", ["</s>"]),                   # near misses are shown in full
    ("<|im_end|", ["<|im_end|>"]),             # a partial at the very end is real output after all
    ("ababababx", ["abx"]),
    ("UUSER:", ["USER:"]),
    ("Stop", ["Stop"]),                        # the whole text is the stop string
    ("plain text", []),                        # nothing to stop at
]


@pytest.mark.parametrize("text,stops", CASES)
def test_stop_filter_cuts_at_the_first_stop_for_every_chunking(text, stops):
    want, want_stopped = expected_output(text, stops)
    n = 0
    for chunks in chunkings(text):
        assert run_filter(stops, chunks) == (want, want_stopped)
        n += 1
    assert n == 2 ** (len(text) - 1)


def test_stop_filter_never_leaks_on_random_texts_and_chunkings():
    rng = random.Random(1234)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc", "a#", "US:ER"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(len(text) - 1, 0)))) if len(text) > 1 else []
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] or [""]
        assert run_filter(stops, chunks) == expected_output(text, stops), (text, stops, chunks)


def test_stop_filter_holds_a_possible_stop_prefix_then_releases_it_when_it_diverges():
    flt = StopFilter(["</s>"])
    assert flt.push("Hello </") == "Hello "     # "</" might become "</s>": held back
    assert flt.push("b>") == "</b>"             # it did not: released at once, not at the end
    assert flt.push(" ok</s") == " ok"
    assert flt.push("> hidden") == ""
    assert flt.stopped
    assert flt.push("more") == "" and flt.flush() == ""


def test_stop_filter_without_stop_strings_passes_text_through_unheld():
    flt = StopFilter([])
    assert flt.push("abc") == "abc"
    assert flt.push("") == ""
    assert flt.flush() == "" and not flt.stopped


# -- IncrementalDecoder with the real tokenizer ------------------------------------------------------

MULTIBYTE_TEXTS = [
    "😀 héllo 你好世界 🦙🎉",
    "Größe 👩‍👩‍👧‍👦 日本語のテキスト",
    "Ελληνικά και русский текст, 한국어 문장 ✨🚀",
    "A long line so the decoding window moves: " + "数学 🧮 mathématiques " * 6,
]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_incremental_decoder_never_emits_a_replacement_character(embedded_tokenizer, text, step):
    tok = embedded_tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # the premise: some characters really are split across tokens
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(decoder.flush())
    for delta in deltas:
        assert REPLACEMENT not in delta
        delta.encode("utf-8")  # complete UTF-8: no lone surrogates either
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == text


def test_incremental_decoder_waits_for_the_rest_of_a_split_character(embedded_tokenizer):
    tok = embedded_tokenizer
    ids = tok("🦙", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2
    decoder = IncrementalDecoder(tok)
    assert [decoder.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1:]) == "🦙"


def test_incremental_decoder_flush_drops_a_dangling_partial_character(embedded_tokenizer):
    tok = embedded_tokenizer
    ids = tok("ok 🦙", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tok)
    shown = "".join(decoder.push([i]) for i in ids[:-1])  # the generation ended inside the emoji
    shown += decoder.flush()
    assert shown == "ok " or shown == "ok"
    assert REPLACEMENT not in shown


def test_incremental_decoder_keeps_spaces_between_words(embedded_tokenizer):
    tok = embedded_tokenizer
    text = "The quick brown fox jumps over the lazy dog, then rests under a tree for a while."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert sum(1 for d in deltas if d) >= len(ids) - 1  # streamed token by token, not at the end


# -- the vicuna_v1.1 template's stop strings (issue 15) ---------------------------------------------------

@pytest.mark.parametrize("text,shown", [
    # a model not trained on the format writes the next turns itself, on new lines, with lookalike markers
    ("The capital of France is Paris.\nUSERS: And of Spain?\nASSISTANT: Madrid.", "The capital of France is Paris."),
    ("Paris.\nUSER: thanks", "Paris."),
    ("Paris.\nASSISTANT: anything else?", "Paris."),
    ("Paris.</s>USER: thanks", "Paris."),
    # a role marker inside a line is text: it is shown whole
    ("Fill in the USER: field, then the ASSISTANT: one.", "Fill in the USER: field, then the ASSISTANT: one."),
    ("Type USERS: and a colon.\nUSERNAME=me", "Type USERS: and a colon.\nUSERNAME=me"),
])
def test_vicuna_stops_at_a_role_marker_starting_a_line_but_not_inside_one(text, shown):
    from conversation_templates import get_template
    stops = get_template("vicuna_v1.1").stop_strings
    for size in (1, 3, len(text)):
        output, stopped = run_filter(stops, [text[i:i + size] for i in range(0, len(text), size)])
        assert output == shown and stopped == (output != text)
