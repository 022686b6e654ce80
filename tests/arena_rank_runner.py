"""Rate battles with LMArena's arena-rank (run in .venv-arena-rank, not the app's environment; see
tests/test_arena_rank_agreement.py, which writes the input and reads the output).

    .venv-arena-rank/bin/python tests/arena_rank_runner.py IN.json OUT.json

IN: {"battles": [{"model_a", "model_b", "winner", "features": [4 raw style differences]}], "style_reg": R}.
OUT: per board ("raw", "raw_reweighted", "style"; sandwich intervals), each model's [rating, lower, upper],
and the style coefficients. Imports nothing of vicuna_demo. arena-rank's bootstrap is left out: its worker
pool forks a multithreaded JAX and hangs, and a few rounds of it say little about interval widths.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
from arena_rank.models.bradley_terry import BradleyTerry
from arena_rank.models.contextual_bradley_terry import ContextualBradleyTerry
from arena_rank.utils.data_utils import ContextualPairDataset, PairDataset

FEATURES = ["f0", "f1", "f2", "f3"]


def board(result) -> dict:
    return {name: [float(result["ratings"][i]), float(result["rating_lower"][i]), float(result["rating_upper"][i])]
            for i, name in enumerate(result["competitors"])}


def main(source: str, target: str) -> None:
    spec = json.load(open(source))
    frame = pd.DataFrame([{"model_a": b["model_a"], "model_b": b["model_b"], "winner": b["winner"],
                           **dict(zip(FEATURES, b["features"]))} for b in spec["battles"]])
    out = {}
    plain = PairDataset.from_pandas(frame)
    out["raw"] = board(BradleyTerry(n_competitors=plain.n_competitors).compute_ratings_and_cis(plain))
    weighted = PairDataset.from_pandas(frame, reweighted=True)
    out["raw_reweighted"] = board(BradleyTerry(n_competitors=weighted.n_competitors).compute_ratings_and_cis(weighted))
    styled = ContextualPairDataset.from_pandas(frame, feature_cols=FEATURES, reweighted=False)
    model = ContextualBradleyTerry(n_competitors=styled.n_competitors, n_features=len(FEATURES), reg=spec["style_reg"])
    result = model.compute_ratings_and_cis(styled)
    out["style"] = board(result)
    out["style_coefficients"] = [float(c) for c in result["coeffs"]]
    json.dump(out, open(target, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
