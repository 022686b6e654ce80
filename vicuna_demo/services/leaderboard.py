"""The leaderboard's views, computed live from the stored votes (the leaderboard tab renders them).

``LeaderboardService.human(include_named)`` reads the battles from the store (``store.battles``: one vote
per battle, counted ones only; anonymous battles only unless named ones are included) and
``LeaderboardService.judge()`` the judge's verdicts on side-by-side rounds (``store.judge_battles``, never
mixed with human votes) with how often the judge and the visitor agreed. Both go through
``battles_view``: Bradley-Terry ratings with a weak prior and 95% intervals (``data.ratings``), models with
fewer than ``--min-battles`` battles listed last as provisional, and the win-rate matrix (pairs with few
battles drawn grey with their count). ``human(include_named, style_control=True)`` gives the
style-controlled board (length and markdown fitted beside the ratings) with its coefficients. Each returns
``(summary markdown, table rows, matplotlib figure or None)``; the rows follow ``HEADERS``.
"""

from __future__ import annotations

import threading

from ..data.agreement import agreement_stats
from ..data.ratings import (MIN_BATTLES, MIN_PAIR_BATTLES, Board, fit_board, interval_text, plot_win_rates,
                            win_rate_table)
from ..data.categories import JUDGE_LABELS
from ..data.outliers import REASON as OUTLIER_REASON
from ..data.storage import NullStore
from .arena import Arena
from .chat import ChatService
from .judge import NO_JUDGE

HEADERS = ["Rank", "Model", "Rating", "95% CI", "Battles"]
ALL_CATEGORIES = "all"
CATEGORY_CHOICES = (ALL_CATEGORIES, "code", "multi_turn", "long_query", "lang:en", "math", "creative_writing",
                    "instruction_following", "hard_prompt")  # others may be typed
PROVISIONAL = "provisional"
NOT_KEPT = "Votes are not being kept on this demo, so there is no leaderboard."


def _count(n: int, word: str) -> str:
    return f"**{n}** {word}{'' if n == 1 else 's'}"


def battles_view(battles: list[tuple[str, str, str]], *, kind: str, min_battles: int = MIN_BATTLES,
                 empty: str = "No votes yet.", style: list | None = None) -> tuple[str, list[list], object | None]:
    """(summary markdown, table rows, matplotlib figure or None) for a list of (model_a, model_b, winner).

    ``kind`` names the battles in the summary ("anonymous", "judge"...); ``empty`` is the summary when
    there is nothing to rate. Battles of a model against itself are left out (and the summary says so).
    Ranked models come first; provisional ones (fewer than ``min_battles`` battles) follow with
    "provisional" instead of a rank and "too few votes" instead of an interval. No figure when there
    is nothing to draw. ``style`` (each battle's style counts, aligned with ``battles``) gives the
    style-controlled board, with sandwich intervals (one fit: fast with 100k battles), and the fitted
    coefficients in the summary."""
    keep = [k for k, (a, b, _) in enumerate(battles) if a != b]
    rated = [battles[k] for k in keep]
    self_battles = len(battles) - len(rated)
    left_out = (f" {_count(self_battles, 'vote')} of a model against itself "
                f"{'is' if self_battles == 1 else 'are'} left out: it says nothing about which model is better."
                if self_battles else "")
    if not rated:
        return empty + left_out, [], None
    if style is None:
        board = fit_board(rated, min_battles=min_battles)
    else:
        board = fit_board(rated, style=[style[k] for k in keep], ci="sandwich", min_battles=min_battles)
    rows = board.rows
    ranked = [r for r in rows if not r.provisional]
    provisional = [r for r in rows if r.provisional]
    table = [[str(r.rank) if r.rank is not None else PROVISIONAL, r.model, round(r.rating), interval_text(r),
              r.battles] for r in ranked + provisional]
    summary = (f"{_count(len(rated), f'counted {kind} battle')} between {_count(len(rows), 'model')}.{left_out} "
               "Bradley-Terry ratings on Chatbot Arena's scale (mean 1000), with a weak prior so that a few votes "
               "cannot give extreme ratings, and 95% intervals; rank = 1 + the number of ranked models whose "
               "interval lies entirely above this one.")
    if board.style_coefficients is not None:
        summary += " " + style_text(board)
    if provisional:
        summary += (f" Models with fewer than {min_battles} battles are provisional: listed last, without a rank "
                    "(their interval is too wide to mean much).")
        if not ranked:
            summary += f" No model has {min_battles} battles yet, so none is ranked."
    names, matrix, games = win_rate_table(rated, [r.model for r in ranked + provisional])
    if ((games > 0) & (games < MIN_PAIR_BATTLES)).any():
        summary += (f" In the win-rate chart, pairs with fewer than {MIN_PAIR_BATTLES} battles are grey and show "
                    "their number of battles instead of a rate.")
    return summary, table, plot_win_rates(names, matrix, games)


STYLE_NAMES = {"sum_assistant_tokens": "length", "header_count": "headers", "list_count": "lists",
               "bold_count": "bold"}


def style_text(board: Board) -> str:
    """The style-controlled board's explanation and fitted coefficients, for the summary."""
    coefficients = ", ".join(f"{STYLE_NAMES.get(name, name)} **{value:+.3f}**"
                             for name, value in board.style_coefficients.items())
    return ("**Style control is on**: answer length and markdown (headers, lists, bold) are fitted beside the "
            "ratings, so a model does not climb by writing longer or more formatted answers; intervals are "
            f"sandwich (closed-form). Style coefficients (log-odds per standard deviation; positive: voters "
            f"preferred more of it): {coefficients}.")


def empty_message(service: ChatService, settings, include_named: bool) -> str:
    """What to do to get a leaderboard, pointing only at tabs that can produce counted votes here."""
    arena = Arena.from_settings(service.model_names(), settings)
    if len(arena.models) < 2:
        loaded = arena.models[0] if arena.models else "no model"
        return ("No votes yet. The leaderboard ranks models by votes between two different models, and only "
                f"{loaded} is loaded here.")
    if not arena.can_battle:
        return ("No votes yet. Anonymous battles are off here (see the ⚔️ Arena tab), so compare two different "
                "models in the 👥 Side by side tab, vote, and tick the box above to include named battles.")
    which = "" if include_named else " of anonymous battles (tick the box to include named comparisons)"
    return ("No votes yet. Battle in the ⚔️ Arena (anonymous) tab and vote: the leaderboard is computed from the "
            f"counted votes{which}.")


class StyleBattles:
    """The battles with their style counts and category labels, read once and then only the votes stored
    since (votes are append-only), so a refresh of 100k battles does not decode 100k rows of JSON again.
    Labels given after a vote (the judge's, ``Store.later_labels``) are added to the battles kept."""

    def __init__(self, store):
        self.store, self.lock, self.kept = store, threading.Lock(), {}

    def read(self, *, anony_only: bool) -> tuple[list, list, list]:
        """(battles, styles, category labels) of the counted battles, aligned."""
        with self.lock:
            flagged = len(self.store.vote_flags())  # a vote flagged later leaves the board: read afresh
            if flagged != self.kept.get("flagged", 0):
                self.kept = {"flagged": flagged}
            battles, styles, labels, ids, last, last_label = self.kept.get(anony_only, ([], [], [], [], 0, 0))
            later, last_label = self.store.later_labels(after_id=last_label)
            if later:
                labels = [have + [x for x in later.get(battle_id, ()) if x not in have] if battle_id in later else have
                          for have, battle_id in zip(labels, ids)]
            new_ids: list = []
            new = self.store.style_battles(anony_only=anony_only, after_id=last, battle_ids=new_ids)
            battles, styles, labels, last = battles + new[0], styles + new[1], labels + new[2], new[3]
            self.kept[anony_only] = (battles, styles, labels, ids + new_ids, last, last_label)
            return battles, styles, labels


def leaderboard_view(service: ChatService, settings, include_named: bool, style_control: bool = False,
                     style_source: StyleBattles | None = None,
                     category: str | None = None) -> tuple[str, list[list], object | None]:
    """(summary markdown, table rows, matplotlib figure or None) from the store's counted battles;
    ``style_control``: the style-controlled board (battles with their stored style counts, read through
    ``style_source`` when given, which keeps what it read); ``category``: only battles with that label."""
    store = service.store
    if isinstance(store, NullStore):
        return NOT_KEPT, [], None
    category = None if category in (None, "", ALL_CATEGORIES) else category
    style = None
    empty = empty_message(service, settings, include_named)
    if style_control or category:
        battles, style, labels = (style_source or StyleBattles(store)).read(anony_only=not include_named)
        if category and battles:
            empty = category_empty_message(category, settings)
        if category:
            keep = [k for k, found in enumerate(labels) if category in found]
            battles, style = [battles[k] for k in keep], [style[k] for k in keep]
        if not style_control:
            style = None
    else:
        battles = store.battles(anony_only=not include_named)
    summary, rows, figure = battles_view(battles, style=style,
                        kind="anonymous and named" if include_named else "anonymous",
                        min_battles=getattr(settings, "min_battles", MIN_BATTLES), empty=empty)
    if rows:
        summary += sampling_text(store.sampling_history()) + outlier_text(store.vote_flags())
    if category:
        summary = f"Category **{category}**: " + summary
    return summary, rows, figure


def category_empty_message(category: str, settings) -> str:
    """Why a category has no battles although others have some."""
    if category in JUDGE_LABELS and not getattr(settings, "judge", None):
        return (f"No battles labelled {category}: this label comes from the judge model, and no judge is set up "
                "on this demo (the rules label code, multi_turn, long_query and lang:xx).")
    later = " The judge labels each battle shortly after its vote." if category in JUDGE_LABELS else ""
    return f"No counted battles labelled {category} yet.{later}"


def outlier_text(flags: dict[str, str]) -> str:
    """The summary's note on votes the outlier-voter check took off the board (``store.vote_flags()``)."""
    n = sum(OUTLIER_REASON in reasons.split(",") for reasons in flags.values())
    if not n:
        return ""
    return (f" {_count(n, 'vote')} of visitors who voted against the ratings far beyond chance "
            f"{'is' if n == 1 else 'are'} left out (the outlier-voter check; kept in the store).")


def sampling_changes(history: list[tuple[float, dict]]) -> list[str]:
    """When the arena's drawable models or their weights changed, from the weights each anonymous battle
    recorded: ["after 120 battles: X added", ...] (nothing before the first battle that recorded them)."""
    changes, previous = [], None
    for n, (_, weights) in enumerate(history):
        current = {m: w for m, w in weights.items() if w > 0}
        if previous is not None and current != previous:
            parts = [f"{m} added" for m in sorted(set(current) - set(previous))]
            parts += [f"{m} removed" for m in sorted(set(previous) - set(current))]
            parts += [f"{m}'s weight {previous[m]:g} -> {current[m]:g}" for m in sorted(set(current) & set(previous))
                      if current[m] != previous[m]]
            changes.append(f"after {n} battle{'' if n == 1 else 's'}: {', '.join(parts)}")
        previous = current
    return changes


def sampling_text(history: list[tuple[float, dict]]) -> str:
    """The summary's note on sampling: the weights in force, and every change (LMArena's lesson: models
    sampled unequally, or added late, are measured on different battles)."""
    if not history:
        return ""
    weights = history[-1][1]
    uniform = len(set(weights.values())) <= 1
    text = (" Pairs are drawn " + ("uniformly" if uniform else "with weights " + ", ".join(
        f"{m}={w:g}" for m, w in weights.items())) + ".")
    changes = sampling_changes(history)
    if changes:
        text += (" **The arena's models changed**: " + "; ".join(changes) + ". Models added later have fewer "
                 "battles and met a different field; the command line's `--reweight` evens out pairs sampled "
                 "unequally.")
    return text


def agreement_text(pairs: list[tuple[str, str]]) -> str:
    """How often the judge and the visitors agreed, on the rounds that have both verdicts."""
    stats = agreement_stats(pairs)
    ties, no_ties = stats["with_ties"], stats["without_ties"]
    if not ties["n"]:
        return ""

    def kappa(row: dict) -> str:
        return "" if row["kappa"] is None else f", Cohen's κ {row['kappa']:.2f}"
    text = (f" Judge and human verdicts agree on **{ties['agree']} of {ties['n']}** round{'' if ties['n'] == 1 else 's'}"
            f" that have both (**{100 * ties['rate']:.0f}%**{kappa(ties)}; both kinds of tie count as a tie)")
    if no_ties["n"]:
        text += (f"; without the rounds either called a tie, **{no_ties['agree']} of {no_ties['n']}** "
                 f"(**{100 * no_ties['rate']:.0f}%**{kappa(no_ties)})")
    return text + ". (The MT-Bench paper: GPT-4 and experts 66% with ties, 85% without.)"


def judge_view(service: ChatService, settings) -> tuple[str, list[list], object | None]:
    """(summary, table, figure) of the judge's verdicts, with the judge/human agreement rate."""
    store = service.store
    if isinstance(store, NullStore):
        return NOT_KEPT, [], None
    empty = (NO_JUDGE if not getattr(settings, "judge", None) else
             "No judge verdicts yet. In the 👥 Side by side tab, finish a round and press ⚖️ Ask the judge.")
    summary, rows, figure = battles_view(store.judge_battles(), kind="judge-verdict",
                                         min_battles=getattr(settings, "min_battles", MIN_BATTLES), empty=empty)
    return summary + agreement_text(store.judge_human_pairs()), rows, figure


class LeaderboardService:
    """The two views of the leaderboard for one app: visitors' votes and the judge's verdicts."""

    def __init__(self, service: ChatService, settings):
        self.service, self.settings = service, settings
        self.style_battles = StyleBattles(service.store)

    def human(self, include_named: bool, style_control: bool = False,
              category: str | None = None) -> tuple[str, list[list], object | None]:
        return leaderboard_view(self.service, self.settings, include_named, style_control, self.style_battles,
                                category)

    def judge(self) -> tuple[str, list[list], object | None]:
        return judge_view(self.service, self.settings)
