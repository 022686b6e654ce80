#!/usr/bin/env bash
# Run the demo: create .venv on first use, install requirements.txt and the embedded model (nothing else: the
# tests have their own .venv-test), then start app.py with your flags, e.g.
#   bash scripts/run.sh --model lmsys/vicuna-7b-v1.5 --share
#   bash scripts/run.sh --self-test        # does this install answer? one chat turn per model, exit 0 or 1
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
if [ -f .venv/.installed-requirements-dev.txt ]; then
    # an older test.sh installed the test requirements into .venv: the app must run without them
    echo "Rebuilding .venv from requirements.txt alone (an older scripts/test.sh installed the test packages into it)" >&2
    rm -rf .venv
fi
ensure_venv .venv requirements.txt
exec .venv/bin/python app.py "$@"
