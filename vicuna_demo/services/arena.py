"""Anonymous-battle logic, free of any UI: who fights whom, which reply gave its model away, what a
vote means, and whether a battle counts for the leaderboard.

    arena = Arena.from_settings(["Vicuna-7B", "SmolLM2"], settings)   # --arena-weights, --identity-words
    model_a, model_b = arena.sample_pair(rng)                         # two different models, sides shuffled
    winner = winner_for("👈 A is better")                              # -> "model_a"
    counted, reason = battle_counts(anony=True, replies=[...], errored=False, moderated=False,
                                    leak_words=arena.leak_words)

Pairing: an unordered pair {i, j} of different models is drawn with probability proportional to
w_i * w_j, then a fair coin decides which one sits on side A. With uniform weights every pair is
equally likely. A model's weight comes from ``--arena-weights`` (``Name=2,Other=0.5``); models the
flag does not name keep weight 1, and weight 0 keeps a model out of battles.

Identity leaks: a reply that contains one of the identity words (``--identity-words``) or a word of a
loaded model's name, as a whole word and ignoring case and accents, gives its model away. "I am
Vicuna" and "vicuña" leak; "vicunas are animals" does not (a plural or any longer word is another
word), which keeps the check from firing on words that merely start like a model's name.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..config import ConfigError
from ..data.storage import WINNERS  # model_a, model_b, tie, tie (bothbad): the one home of the stored values

# vote button labels, in WINNERS' order, and what they mean (FastChat's clean-battle winners)
VOTES: dict[str, str] = dict(zip(("👈 A is better", "👉 B is better", "🤝 Tie", "👎 Both are bad"), WINNERS))
_VOTE_ALIASES = {"a": "model_a", "left": "model_a", "leftvote": "model_a",
                 "b": "model_b", "right": "model_b", "rightvote": "model_b",
                 "tie": "tie", "tievote": "tie",
                 "bothbad": "tie (bothbad)", "both bad": "tie (bothbad)", "bothbad_vote": "tie (bothbad)"}

# reasons a battle is kept out of the ratings, in the order they are reported
REASON_MODERATED = "moderated"
REASON_ERROR = "error"
REASON_IDENTITY = "identity_leak"
REASON_SAME_MODEL = "same_model"
REASON_UNREAD = "unread"
REASON_DAILY_CAP = "daily_cap"
# a reply stopped with fewer tokens than this on screen was not read: the vote is kept, not counted
MIN_SHOWN_TOKENS = 16

# words in model names that say nothing about which model it is (sizes and versions are dropped too)
_GENERIC_NAME_WORDS = frozenset(
    "offline online chat instruct instruction base model models hf gguf ggml fp16 bf16 fp32 int8 int4 8bit 4bit "
    "awq gptq exl2 q4 q8 template templates local remote test demo latest preview new old small large mini "
    "tiny the and with for of".split())
_SIZE_OR_VERSION = re.compile(r"^(v?\d+(\.\d+)*[a-z]?|\d+(\.\d+)?[kmbt]|x?\d+x\d+[a-z]?|q\d\w*)$")


class ArenaConfigError(ConfigError):
    """--arena-weights cannot be used; the message says why."""


class NotEnoughModels(ValueError):
    """A battle needs two different models with a positive weight."""


def parse_weights(text: str, models: Sequence[str]) -> dict[str, float]:
    """``"Name=2,Other=1"`` -> a weight for every model (1 where unnamed). Raises ArenaConfigError.

    Names are matched exactly, then case-insensitively; weights must be finite numbers >= 0.
    """
    weights = {name: 1.0 for name in models}
    lower = {name.casefold(): name for name in models}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, raw = part.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ArenaConfigError(f"--arena-weights: '{part}' is not NAME=WEIGHT (e.g. Vicuna-7B=2,SmolLM2=1).")
        model = name if name in weights else lower.get(name.casefold())
        if model is None:
            raise ArenaConfigError(f"--arena-weights: no loaded model is called {name!r}; the models are: "
                                   f"{', '.join(models) or '(none)'}.")
        try:
            weight = float(raw)
        except ValueError:
            raise ArenaConfigError(f"--arena-weights: the weight of {name!r} must be a number, got {raw.strip()!r}.") \
                from None
        if not math.isfinite(weight) or weight < 0:
            raise ArenaConfigError(f"--arena-weights: the weight of {name!r} must be a finite number >= 0, "
                                   f"got {raw.strip()!r}.")
        weights[model] = weight
    return weights


def _fold(text: str) -> str:
    """Lower-case, accents removed ("Vicuña" -> "vicuna"), so matching ignores both."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def name_words(name: str) -> list[str]:
    """The words of a model name that identify it: ``"Vicuna-7B v1.5 (8bit)"`` -> ``["vicuna"]``.

    Sizes, versions, numbers, quantisation and other generic words are left out; so are words under
    three characters."""
    words = []
    for word in re.split(r"[^\w]+|_", _fold(name)):
        if len(word) >= 3 and not word.isdigit() and word not in _GENERIC_NAME_WORDS \
                and not _SIZE_OR_VERSION.match(word):
            words.append(word)
    return words


def identity_words_for(models: Iterable[str], extra_words: Iterable[str]) -> tuple[str, ...]:
    """The configured identity words plus the identifying words of every model name, folded, deduplicated."""
    seen: dict[str, None] = {}
    for word in extra_words:
        folded = " ".join(_fold(word).split())
        if folded:
            seen[folded] = None
    for name in models:
        for word in name_words(name):
            seen[word] = None
    return tuple(seen)


def _word_pattern(words: Sequence[str]) -> re.Pattern | None:
    if not words:
        return None
    # longest first, so "meta ai" wins over "meta"; inner spaces match any run of whitespace
    alternatives = sorted({r"\s+".join(map(re.escape, w.split())) for w in words}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(" + "|".join(alternatives) + r")(?!\w)")


def find_identity_leak(texts: Iterable[str], words: Sequence[str]) -> str | None:
    """The first identity word found (folded) in any of ``texts`` as a whole word, else None."""
    pattern = _word_pattern([w for w in words if w.strip()])
    if pattern is None:
        return None
    for text in texts:
        match = pattern.search(_fold(text or ""))
        if match:
            return " ".join(match.group(1).split())
    return None


def winner_for(vote: str) -> str:
    """A vote button label, a short name (a, b, tie, bothbad) or a winner value -> the stored winner.

    Raises ValueError for anything else."""
    text = (vote or "").strip()
    if text in VOTES:
        return VOTES[text]
    if text in WINNERS:
        return text
    folded = text.casefold()
    if folded in _VOTE_ALIASES:
        return _VOTE_ALIASES[folded]
    for label, winner in VOTES.items():  # the label without its emoji ("A is better")
        if folded == label.split(" ", 1)[1].casefold():
            return winner
    raise ValueError(f"Unknown vote {vote!r}: use one of {', '.join(VOTES)} (or a, b, tie, bothbad).")


def unread(shown: dict) -> bool:
    """True when a side of the battle's last round was stopped before showing MIN_SHOWN_TOKENS tokens
    (``shown``: per side {"tokens", "chars", "status"}, see ``Battle.shown``). A finished reply counts
    whatever its length ("4." is a whole answer); a failed one is the ``error`` reason's business."""
    return any(side["status"] == "cancelled" and side["tokens"] < MIN_SHOWN_TOKENS for side in shown.values())


def battle_counts(*, anony: bool, replies: Iterable[str], errored: bool, moderated: bool,
                  leak_words: Sequence[str], same_model: bool = False,
                  shown: dict | None = None) -> tuple[bool, str | None]:
    """(counted, reason) for a finished battle. A battle is not counted when any round of it was
    stopped by moderation (input or output), when a reply failed (an error or a message too long for a
    model), in anonymous battles only, when a reply gave a model's identity away (named battles show
    the names anyway), when both sides were the same model (it says nothing about which model is
    better), or when a reply of the last round was stopped before the visitor could read it (``shown``,
    see ``unread``). ``reason`` joins every reason that applies with ","."""
    reasons = []
    if same_model:
        reasons.append(REASON_SAME_MODEL)
    if moderated:
        reasons.append(REASON_MODERATED)
    if errored:
        reasons.append(REASON_ERROR)
    if anony and find_identity_leak(replies, leak_words):
        reasons.append(REASON_IDENTITY)
    if shown is not None and unread(shown):
        reasons.append(REASON_UNREAD)
    return (not reasons, ",".join(reasons) or None)


@dataclass(frozen=True)
class Arena:
    """The models that may fight, their weights, and the words that give a model away."""

    models: tuple[str, ...]
    weights: tuple[float, ...]
    leak_words: tuple[str, ...]

    @classmethod
    def from_settings(cls, models: Sequence[str], settings) -> "Arena":
        """Read ``settings.arena_weights`` and ``settings.identity_words``; raises ArenaConfigError."""
        weights = parse_weights(getattr(settings, "arena_weights", ""), models)
        words = identity_words_for(models, getattr(settings, "identity_words", ()))
        return cls(models=tuple(models), weights=tuple(weights[m] for m in models), leak_words=words)

    @property
    def eligible(self) -> tuple[str, ...]:
        """Models with a positive weight."""
        return tuple(m for m, w in zip(self.models, self.weights) if w > 0)

    @property
    def can_battle(self) -> bool:
        return len(self.eligible) >= 2

    def unavailable_reason(self) -> str:
        """Why no battle can start ('' when one can), for a visitor (the start-up log tells the operator how to
        change it: services/runtime.operator_hints)."""
        if len(self.models) < 2:
            loaded = self.models[0] if self.models else "no model"
            return (f"The anonymous arena needs at least two models, and only {loaded} is loaded here; the "
                    "👥 Side by side tab still works with one.")
        if not self.can_battle:
            return ("Anonymous battles are switched off on this demo; compare models by name in the 👥 Side by side "
                    "tab.")
        return ""

    def pair_probabilities(self) -> dict[tuple[str, str], float]:
        """P(unordered pair) for every pair of different eligible models, keyed in ``models`` order."""
        pairs = {}
        top = max(self.weights, default=0.0)
        scaled = [w / top if top > 0 else 0.0 for w in self.weights]  # no underflow with tiny weights
        for i, a in enumerate(self.models):
            for j in range(i + 1, len(self.models)):
                product = scaled[i] * scaled[j]
                if product > 0:
                    pairs[(a, self.models[j])] = product
        total = math.fsum(pairs.values())
        return {pair: p / total for pair, p in pairs.items()} if total > 0 else {}

    def sampling_record(self, model_a: str, model_b: str) -> dict:
        """What a battle keeps of how its pair was drawn: every model's weight and the pair's probability."""
        pair = self.pair_probabilities()
        probability = pair.get((model_a, model_b), pair.get((model_b, model_a), 0.0))
        return {"weights": dict(zip(self.models, self.weights)), "pair_probability": probability}

    def sample_pair(self, rng: random.Random | None = None) -> tuple[str, str]:
        """(model_a, model_b): two different models, the pair drawn by weight and the sides by a coin."""
        rng = rng or random.SystemRandom()
        probabilities = self.pair_probabilities()
        if not probabilities:
            raise NotEnoughModels(self.unavailable_reason() or "No two models can be paired.")
        pairs = list(probabilities)
        first, second = rng.choices(pairs, weights=[probabilities[p] for p in pairs], k=1)[0]
        return (first, second) if rng.random() < 0.5 else (second, first)
