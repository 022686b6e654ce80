#!/usr/bin/env bash
# Run the demo: create .venv on first use, install requirements.txt and the embedded model, then start
# app.py with your flags, e.g.  bash scripts/run.sh --model lmsys/vicuna-7b-v1.5 --share
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv requirements.txt
exec .venv/bin/python app.py "$@"
