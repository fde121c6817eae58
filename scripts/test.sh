#!/usr/bin/env bash
# Set up a fresh test environment in .venv-test and run the whole test suite (extra pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser tests drive Debian's chromium (tests/browser.py); Playwright's own browser download cannot work offline.
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
python3 -m venv --clear .venv-test
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check --editable ".[local,test]"
exec .venv-test/bin/python -m pytest "$@"
