#!/usr/bin/env bash
# Build .venv-arena-rank: LMArena's arena-rank (requirements-arena-rank.txt) in an environment of its own, for
# tests/test_arena_rank_agreement.py. Does nothing when it is already there. Prints the environment's python.
#   bash scripts/arena_rank_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="${ARENA_RANK_VENV:-.venv-arena-rank}"
if ! "$env_dir/bin/python" -c "import arena_rank" >/dev/null 2>&1; then
    python3 -m venv "$env_dir" >&2
    "$env_dir/bin/python" -m pip install -q --disable-pip-version-check -r requirements-arena-rank.txt >&2
fi
echo "$env_dir/bin/python"
