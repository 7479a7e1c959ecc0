#!/usr/bin/env bash
# The real-browser test (tests/browser): JupyterLab + headless Debian Chromium via Playwright,
# every notebook run in the browser. Installs Chromium and a Devanagari font (fonts-noto-core:
# the notebooks print Hindi) with apt-get where it can (root, apt, not yet installed) and the
# playwright Python package into the venv; Playwright's own browser download is never used.
# When Chromium cannot be had it says so plainly and exits 0.
#
#   scripts/browser_test.sh                 run the test; artifacts go to out/browser/ (ignored)
#   scripts/browser_test.sh --screenshot    only the welcome notebook, and write its picture to
#                                           docs/screenshot.png (the README's, refreshed on purpose)
# Other arguments go to pytest. After the run, the tracked files must be as they were.
set -u
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
CHROMIUM="${SPARK_LAB_CHROMIUM:-/usr/bin/chromium}"

skip() { echo "browser test SKIPPED: $*"; exit 0; }

SHOT=0
if [ "${1:-}" = "--screenshot" ]; then SHOT=1; shift; fi

apt_install() {     # apt_install PACKAGE...: quietly, with one 'apt-get update' retry
    local log=/tmp/spark-lab-apt-browser.log
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    echo "browser test: installing $* with apt-get"
    apt-get install -y -q "$@" >>"$log" 2>&1 && return 0
    apt-get update -q >>"$log" 2>&1 && apt-get install -y -q "$@" >>"$log" 2>&1
}

[ -x "$PY" ] || skip "no virtual environment at $VENV (run 'make setup' first)"

if [ ! -x "$CHROMIUM" ]; then
    apt_install chromium
    [ -x "$CHROMIUM" ] || skip "Chromium is not installed at $CHROMIUM and could not be installed (needs root and apt-get; see /tmp/spark-lab-apt-browser.log)"
fi
# Devanagari glyphs (Noto Sans Devanagari): without them Hindi renders as boxes, and the test says so
if command -v fc-list >/dev/null 2>&1 && [ -z "$(fc-list :lang=hi family 2>/dev/null)" ]; then
    apt_install fonts-noto-core || echo "browser test: could not install fonts-noto-core (the Hindi check will fail)"
fi

if ! "$PY" -c "import playwright" 2>/dev/null; then
    "$PY" -m pip install -q "playwright>=1.45" || skip "the playwright Python package could not be installed"
fi

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 SPARK_LAB_THREADS="${SPARK_LAB_THREADS:-1}" CI="${CI:-1}"
if [ "$SHOT" = 1 ]; then
    # the welcome notebook only: its chat is the picture the README shows
    export SPARK_LAB_SCREENSHOT="$PWD/docs/screenshot.png"
    exec "$PY" -m pytest -q -s -p no:cacheprovider -m browser tests/browser -k welcome "$@"
fi

# the run must leave the tracked files as they were (artifacts go to out/browser/)
before="$(git status --porcelain --untracked-files=no 2>/dev/null)"
"$PY" -m pytest -q -s -p no:cacheprovider -m browser tests/browser "$@"
rc=$?
after="$(git status --porcelain --untracked-files=no 2>/dev/null)"
# (in a tree that others edit during the run, their edits show here too: SPARK_LAB_GIT_CHECK=0 skips it)
if [ "${SPARK_LAB_GIT_CHECK:-1}" != 0 ] && [ "$before" != "$after" ]; then
    echo "browser test FAILED: the run changed tracked files (git status before '<', after '>'):"
    diff <(echo "$before") <(echo "$after") | grep '^[<>]'
    [ "$rc" = 0 ] && rc=1
fi
exit "$rc"
