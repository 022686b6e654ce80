#!/usr/bin/env bash
# Run the tests: create .venv-test on first use (not the app's .venv: scripts/_venv.sh says why), install
# requirements-dev.txt and the embedded model, install
# Debian's chromium and the page's fonts for the browser tests if they are missing, then run pytest with
# your arguments, e.g.
#   bash scripts/test.sh                                   # everything (~22 min on 2 cores)
#   bash scripts/test.sh tests/test_engine.py -q            # one file
#   bash scripts/test.sh -m "not browser and not slow"      # the fast subset, no browser
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv .venv-test requirements-dev.txt
# LMArena's arena-rank, the reference of tests/test_arena_rank_agreement.py, in an environment of its own (its
# numpy and jax pins stay out of .venv-test); built here, like the packages above, so no test downloads anything
bash scripts/arena_rank_env.sh >/dev/null || echo "warning: could not build .venv-arena-rank; its agreement test will be skipped" >&2

# What the browser tests need, and nothing more: chromium without its recommended packages (which
# pull in systemd, samba libraries, perl, ...: on a Debian 12 slim base 293 packages / 882 MB with
# them, 152 / 685 MB without), and the fonts the page is drawn with offline, including colour emoji
# (tab names and buttons use them), so the tests see what visitors see.
BROWSER_PACKAGES=(chromium fonts-dejavu-core fonts-liberation fonts-noto-color-emoji)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for package in "${BROWSER_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
elif [ ! -x /usr/bin/chromium ]; then
    echo "error: /usr/bin/chromium is missing; install chromium and a colour emoji font for the browser tests," \
         "or skip them with -m 'not browser'" >&2
    exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing ${missing[*]} for the browser tests (apt-get --no-install-recommends)" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "error: ${missing[*]} missing; install as root: apt-get install --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv-test/bin/python -m pytest "$@"
