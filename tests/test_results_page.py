"""RESULTS.md is generated from the raw results, and the benchmarks index names every script.

benchmarks/RESULTS.md must be what benchmarks/results_page.py makes of benchmarks/results/; benchmarks/README.md
says which scripts users run and which serve development."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_results_page_is_generated_from_the_raw_files():
    sys.path.insert(0, str(BENCH))
    try:
        import results_page
    finally:
        sys.path.remove(str(BENCH))
    assert (BENCH / "RESULTS.md").read_text() == results_page.render(), \
        "regenerate it: python benchmarks/results_page.py"
    for claim in results_page.CLAIMS:
        assert "*" in claim.file or (BENCH / "results" / claim.file).exists(), claim.file


def test_the_benchmarks_index_names_every_script():
    index = (BENCH / "README.md").read_text()
    missing = [p.name for p in sorted(BENCH.glob("*.py")) if f"`{p.name}`" not in index]
    assert not missing, f"add to benchmarks/README.md: {missing}"
