#!/usr/bin/env bash
# Set up a fresh test environment in .venv-test and run the whole test suite (extra pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }  # the job tests start their own
python3 -m venv --clear .venv-test
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check --editable ".[local,test]"
exec .venv-test/bin/python -m pytest "$@"
