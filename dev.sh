#!/usr/bin/env bash
# Quick start on a fresh machine with Python 3.11:
#   ./dev.sh up      install what is needed, then serve search over the sample corpus
#   ./dev.sh test    install what is needed, then run the test suite (what CI runs)
# Any further arguments go to `dtrag up` or to pytest.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${DTRAG_VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

install() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp="$VENV/.dtrag-installed"
    local wanted
    wanted="$(sha256sum pyproject.toml | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
        return
    fi
    echo "installing dependencies into $VENV (first run takes a few minutes) ..." >&2
    local log="$VENV/install.log"
    # The CPU build of torch first, so sentence-transformers does not pull a CUDA one.
    if ! { "$VENV/bin/python" -m pip install --upgrade pip \
           && "$VENV/bin/python" -m pip install "torch==2.13.0" \
           && "$VENV/bin/python" -m pip install -e ".[test]"; } > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "installation failed; the full log is $log" >&2
        exit 1
    fi
    echo "$wanted" > "$stamp"
}

command="${1:-}"
shift || true
case "$command" in
    up)
        install
        exec "$VENV/bin/dtrag" up "$@"
        ;;
    test)
        install
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh up [dtrag up options] | ./dev.sh test [pytest options]" >&2
        exit 2
        ;;
esac
