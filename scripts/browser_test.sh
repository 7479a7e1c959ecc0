#!/usr/bin/env bash
# The real-browser test (tests/browser): JupyterLab + headless Debian Chromium via Playwright.
# Installs Chromium with apt-get where it can (root, apt, not yet installed) and the playwright
# Python package into the venv; Playwright's own browser download is never used. When Chromium
# cannot be had it says so plainly and exits 0.
set -u
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
CHROMIUM="${SPARK_LAB_CHROMIUM:-/usr/bin/chromium}"

skip() { echo "browser test SKIPPED: $*"; exit 0; }

[ -x "$PY" ] || skip "no virtual environment at $VENV (run 'make setup' first)"

if [ ! -x "$CHROMIUM" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "browser test: installing Debian's chromium with apt-get"
        if ! apt-get install -y -q chromium >/tmp/spark-lab-apt-chromium.log 2>&1; then
            apt-get update -q >>/tmp/spark-lab-apt-chromium.log 2>&1 &&
                apt-get install -y -q chromium >>/tmp/spark-lab-apt-chromium.log 2>&1
        fi
    fi
    [ -x "$CHROMIUM" ] || skip "Chromium is not installed at $CHROMIUM and could not be installed (needs root and apt-get; see /tmp/spark-lab-apt-chromium.log)"
fi

if ! "$PY" -c "import playwright" 2>/dev/null; then
    "$PY" -m pip install -q "playwright>=1.45" || skip "the playwright Python package could not be installed"
fi

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 SPARK_LAB_THREADS="${SPARK_LAB_THREADS:-1}" CI="${CI:-1}"
exec "$PY" -m pytest -q -s -p no:cacheprovider -m browser tests/browser "$@"
