"""The outlier-voter check (data/outliers.py): a visitor who votes against the ratings far beyond chance is
found, their votes are flagged in the store (kept, read as not counted with the reason), and honest
visitors are left alone.

Run: .venv/bin/python -m pytest tests/test_outliers.py -q
"""

from __future__ import annotations

import numpy as np

from vicuna_demo.data.outliers import REASON, check
from vicuna_demo.data.records import VoteRecord
from vicuna_demo.data.storage import Store

TRUE = {"strong": 1200.0, "middle": 1000.0, "weak": 800.0}


def fill(store: Store, rng: np.random.Generator) -> None:
    names = list(TRUE)
    k = 0
    for client, honest, n in [(f"honest-{i}", True, 60) for i in range(20)] + [("troll", False, 40)]:
        for _ in range(n):
            i, j = rng.choice(3, size=2, replace=False)
            a, b = names[i], names[j]
            p = 1 / (1 + 10 ** (-(TRUE[a] - TRUE[b]) / 400))
            a_wins = rng.random() < p if honest else TRUE[a] < TRUE[b]   # the troll always picks the weaker
            store.log_vote(VoteRecord(battle_id=f"b{k}", tstamp=float(k), client_hash=client, anony=True, model_a=a,
                                      model_b=b, winner="model_a" if a_wins else "model_b", counted=True,
                                      not_counted_reason=None, conversation_a_id="ca", conversation_b_id="cb"))
            k += 1


def test_a_voter_who_always_picks_the_weaker_model_is_flagged_and_honest_ones_are_not(tmp_path):
    with Store(tmp_path) as store:
        fill(store, np.random.default_rng(7))
        found = check(store, apply=True)
        assert set(found) == {"troll"} and found["troll"][0] == 40 and found["troll"][1] < -3
        troll = [v for v in store.vote_rows() if v["client_hash"] == "troll"]
        assert all(v["counted"] is False and v["not_counted_reason"] == REASON for v in troll)
        assert len(store.battles()) == 20 * 60                  # the leaderboard leaves them out
        assert store.vote_flags() and len(store.vote_flags()) == 40
        assert check(store) == {}                                # found once, flagged once


def test_the_pages_style_read_drops_votes_flagged_after_it_read_them(tmp_path):
    from vicuna_demo.services.leaderboard import StyleBattles

    with Store(tmp_path) as store:
        fill(store, np.random.default_rng(8))
        source = StyleBattles(store)
        assert len(source.read(anony_only=True)[0]) == 20 * 60 + 40
        check(store, apply=True)
        assert len(source.read(anony_only=True)[0]) == 20 * 60
