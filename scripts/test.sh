#!/usr/bin/env bash
# Run the tests: create .venv on first use, install requirements-dev.txt and the embedded model, install
# Debian's chromium for the browser tests if it is missing, then run pytest with your arguments, e.g.
#   bash scripts/test.sh                         # everything
#   bash scripts/test.sh tests/test_engine.py -q  # one file
#   bash scripts/test.sh -m "not browser"        # without a browser
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv requirements-dev.txt

if [ ! -x /usr/bin/chromium ]; then
    echo "Installing Debian's chromium for the browser tests" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "error: /usr/bin/chromium is missing; install it as root: apt-get install -y chromium" >&2
        exit 1
    fi
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium >&2
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python -m pytest "$@"
