"""Tests of the arena's pure logic (vicuna_demo/services/arena.py): pairing and its weights, side shuffling,
identity-leak detection, vote mapping and the rules that keep a battle out of the leaderboard.

The statistical tests draw with a fixed seed, so they are deterministic; each would fail for the
defect it names (e.g. sides not shuffled gives a binomial p-value of ~0)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from scipy import stats

from vicuna_demo.services.arena import (
    VOTES,
    Arena,
    ArenaConfigError,
    NotEnoughModels,
    battle_counts,
    find_identity_leak,
    identity_words_for,
    name_words,
    parse_weights,
    winner_for,
)
from vicuna_demo.config import ConfigError, Settings

MODELS = ["Vicuna-13B", "Koala-13B", "Alpaca-7B", "SmolLM2-135M (offline)"]
DRAWS = 4000


def arena(models=MODELS, weights="", words=()):
    return Arena.from_settings(models, Settings(arena_weights=weights, identity_words=tuple(words)))


# -- pairing -----------------------------------------------------------------------------------------

def test_never_the_same_model_on_both_sides():
    rng = random.Random(1)
    for models in (MODELS[:2], MODELS[:3], MODELS):
        a = arena(models)
        for _ in range(DRAWS // 2):
            left, right = a.sample_pair(rng)
            assert left != right
            assert {left, right} <= set(models)


def test_every_pair_is_drawn_uniformly_by_default():
    rng = random.Random(2)
    counts = Counter(frozenset(arena().sample_pair(rng)) for _ in range(DRAWS))
    pairs = [frozenset(p) for p in itertools.combinations(MODELS, 2)]
    assert set(counts) == set(pairs)
    observed = [counts[p] for p in pairs]
    assert stats.chisquare(observed).pvalue > 0.001


def test_sides_are_shuffled_each_model_is_on_side_a_half_the_time():
    rng = random.Random(3)
    a = arena()
    on_a, seen = Counter(), Counter()
    for _ in range(DRAWS):
        left, right = a.sample_pair(rng)
        on_a[left] += 1
        seen[left] += 1
        seen[right] += 1
    for model in MODELS:
        assert stats.binomtest(on_a[model], seen[model], 0.5).pvalue > 0.001, (model, on_a[model], seen[model])


def test_weights_are_respected_pairs_drawn_in_proportion_to_the_product_of_weights():
    a = arena(weights="Vicuna-13B=3,koala-13b=1,Alpaca-7B=1,SmolLM2-135M (offline)=0")
    probabilities = a.pair_probabilities()
    # products: V*K = 3, V*A = 3, K*A = 1, nothing with the zero-weight model
    assert probabilities == pytest.approx({("Vicuna-13B", "Koala-13B"): 3 / 7, ("Vicuna-13B", "Alpaca-7B"): 3 / 7,
                                           ("Koala-13B", "Alpaca-7B"): 1 / 7})
    rng = random.Random(4)
    counts = Counter(tuple(sorted(a.sample_pair(rng), key=MODELS.index)) for _ in range(DRAWS))
    assert "SmolLM2-135M (offline)" not in {m for pair in counts for m in pair}
    pairs = list(probabilities)
    observed = [counts[p] for p in pairs]
    expected = [probabilities[p] * DRAWS for p in pairs]
    assert stats.chisquare(observed, expected).pvalue > 0.001
    # and the heavier model really is drawn more: in 6/7 of the battles rather than 2/3 with uniform weights
    vicuna = sum(n for pair, n in counts.items() if "Vicuna-13B" in pair)
    assert stats.binomtest(vicuna, DRAWS, 6 / 7).pvalue > 0.001
    assert stats.binomtest(vicuna, DRAWS, 2 / 3).pvalue < 1e-6


def test_models_not_named_in_the_weights_keep_weight_one():
    assert parse_weights("Koala-13B=2", MODELS) == {"Vicuna-13B": 1.0, "Koala-13B": 2.0, "Alpaca-7B": 1.0,
                                                    "SmolLM2-135M (offline)": 1.0}
    assert parse_weights("", MODELS) == dict.fromkeys(MODELS, 1.0)
    assert parse_weights(" , ", MODELS) == dict.fromkeys(MODELS, 1.0)


@pytest.mark.parametrize("text, message", [
    ("GPT-9=2", "no loaded model is called 'GPT-9'"),
    ("Koala-13B=heavy", "must be a number"),
    ("Koala-13B=-1", "finite number >= 0"),
    ("Koala-13B=nan", "finite number >= 0"),
    ("Koala-13B=inf", "finite number >= 0"),
    ("Koala-13B", "is not NAME=WEIGHT"),
    ("=2", "is not NAME=WEIGHT"),
])
def test_bad_weights_give_a_clear_config_error(text, message):
    with pytest.raises(ArenaConfigError, match=message) as caught:
        parse_weights(text, MODELS)
    assert isinstance(caught.value, ConfigError)  # app.main prints it as one "error:" line
    if "GPT-9" in text:
        assert "Vicuna-13B" in str(caught.value)  # and lists the models that exist


def test_zero_weights_or_one_model_mean_no_battle_with_a_reason_never_nan():
    all_zero = arena(weights=",".join(f"{m}=0" for m in MODELS))
    one_left = arena(weights="Vicuna-13B=0,Koala-13B=0,Alpaca-7B=0")
    single = arena(models=["Vicuna-13B"])
    for a in (all_zero, one_left, single):
        assert not a.can_battle
        assert a.pair_probabilities() == {}
        assert a.unavailable_reason()
        with pytest.raises(NotEnoughModels):
            a.sample_pair(random.Random(0))
    assert "only Vicuna-13B is loaded" in single.unavailable_reason()
    assert "switched off on this demo" in all_zero.unavailable_reason()
    assert not any("--" in a.unavailable_reason() for a in (all_zero, one_left, single))  # for visitors: no flags
    tiny = arena(weights="Vicuna-13B=1e-300,Koala-13B=1e-300,Alpaca-7B=0,SmolLM2-135M (offline)=0")
    assert tiny.pair_probabilities() == {("Vicuna-13B", "Koala-13B"): 1.0}  # 1e-300 squared would underflow
    assert set(tiny.sample_pair(random.Random(0))) == {"Vicuna-13B", "Koala-13B"}


# -- identity leaks ----------------------------------------------------------------------------------

DEFAULT_WORDS = Settings().identity_words


@pytest.mark.parametrize("reply, leaked", [
    ("I am Vicuna, a language model trained by researchers.", "vicuna"),
    ("I AM VICUNA.", "vicuna"),
    ("As Vicuna's creators say...", "vicuna"),
    ("I'm a Vicuña model.", "vicuna"),                 # accents are ignored
    ("I was built by Meta   AI.", "meta ai"),          # any whitespace inside a phrase
    ("I was trained by OpenAI.", "openai"),
    ("I'm GPT-4.", "gpt-4"),
    ("I am Koala, from Berkeley.", "koala"),           # a word of a loaded model's name
    ("Vicunas are animals related to llamas.", None),  # plurals are other words: documented choice
    ("The metadata is attached; see the llamas below.", None),
    ("Nothing to see here.", None),
])
def test_identity_leak_is_case_insensitive_and_word_boundary_aware(reply, leaked):
    words = identity_words_for(["Koala-13B", "Alpaca-7B"], DEFAULT_WORDS)
    assert find_identity_leak([reply], words) == leaked


def test_model_name_words_leave_out_sizes_versions_and_generic_words():
    assert name_words("Vicuna-7B v1.5 (8bit)") == ["vicuna"]
    assert name_words("SmolLM2-135M (offline)") == ["smollm2"]
    assert name_words("llama-2-13b-chat") == ["llama"]
    assert name_words("Qwen2.5-0.5B-Instruct") == ["qwen2"]
    words = arena(words=()).leak_words
    assert {"vicuna", "koala", "alpaca", "smollm2"} <= set(words)
    assert "offline" not in words and "13b" not in words


def test_identity_words_come_from_the_settings_and_the_model_names():
    a = arena(models=["Koala-13B", "Alpaca-7B"], words=("Zebra Labs",))
    assert find_identity_leak(["made by zebra labs"], a.leak_words) == "zebra labs"
    assert find_identity_leak(["I am an Alpaca"], a.leak_words) == "alpaca"
    assert find_identity_leak(["I am Vicuna"], a.leak_words) is None  # not configured, not loaded
    assert find_identity_leak(["anything"], ()) is None


# -- votes and counting ------------------------------------------------------------------------------

def test_vote_labels_map_to_clean_battle_winners():
    assert {label: winner_for(label) for label in VOTES} == {
        "👈 A is better": "model_a", "👉 B is better": "model_b", "🤝 Tie": "tie", "👎 Both are bad": "tie (bothbad)"}
    for alias, winner in [("a", "model_a"), ("B", "model_b"), ("tie", "tie"), ("bothbad", "tie (bothbad)"),
                          ("model_b", "model_b"), ("tie (bothbad)", "tie (bothbad)"), ("A is better", "model_a"),
                          ("both are bad", "tie (bothbad)")]:
        assert winner_for(alias) == winner


@pytest.mark.parametrize("bad", ["", "c", "model_c", "👈", None])
def test_unknown_votes_are_refused(bad):
    with pytest.raises(ValueError, match="Unknown vote"):
        winner_for(bad)


def test_a_clean_battle_counts():
    assert battle_counts(anony=True, replies=["Paris.", "It is Paris."], errored=False, moderated=False,
                         leak_words=DEFAULT_WORDS) == (True, None)


@pytest.mark.parametrize("anony, replies, errored, moderated, expected", [
    (True, ["I am Vicuna.", "Paris."], False, False, (False, "identity_leak")),
    (False, ["I am Vicuna.", "Paris."], False, False, (True, None)),   # named battles show the names anyway
    (True, ["Paris.", ""], True, False, (False, "error")),
    (False, ["Paris.", ""], True, False, (False, "error")),
    (True, ["", ""], False, True, (False, "moderated")),
    (False, ["", ""], False, True, (False, "moderated")),
    (True, ["I am Vicuna.", ""], True, True, (False, "moderated,error,identity_leak")),
])
def test_battles_with_moderation_errors_or_identity_leaks_are_not_counted(anony, replies, errored, moderated,
                                                                          expected):
    assert battle_counts(anony=anony, replies=replies, errored=errored, moderated=moderated,
                         leak_words=DEFAULT_WORDS) == expected


def test_app_refuses_arena_weights_for_an_unknown_model_before_loading_anything():
    """A typo in --arena-weights stops `python app.py` with one line, without waiting for models to load."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    started = time.monotonic()
    done = subprocess.run([sys.executable, "app.py", "--arena-weights", "Nope=2", "--log-dir", ""],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and "Nope" in lines[0] and "SmolLM2" in lines[0], done.stderr
    assert "Loading" not in done.stdout + done.stderr
    assert time.monotonic() - started < 60
