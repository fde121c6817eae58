#!/usr/bin/env bash
# Set up a fresh test environment in .venv-test and run the whole test suite (extra pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
# System tools the tests need, installed only when missing.
command -v exiftool >/dev/null || { apt-get update -qq && apt-get install -y -qq libimage-exiftool-perl; }  # reads our XMP
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }  # tests/browser.py
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }  # tests/redis_server.py
python3 -m venv --clear .venv-test
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check --editable ".[local,test]"
# The client SDKs the docs' Python examples run with, current releases apart from the server's pins (tests/test_docs.py).
python3 -m venv --clear .venv-clients
.venv-clients/bin/python -m pip install --quiet --disable-pip-version-check --requirement tests/doc-clients.txt
exec .venv-test/bin/python -m pytest "$@"
