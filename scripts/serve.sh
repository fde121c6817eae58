#!/usr/bin/env bash
# Set up (once) and run the service on http://127.0.0.1:1416 (HAYHOOKS_HOST/HAYHOOKS_PORT change it). Settings come from the environment (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${IMAGE_GENERATION_BACKEND:-huggingface_api}" = "local" ] && extra="[local]"
if [ ! -x .venv/bin/image-generation-server ] || [ pyproject.toml -nt .venv/.installed ] || [ "$extra" != "$(cat .venv/.installed 2>/dev/null)" ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --editable ".$extra"
  echo "$extra" > .venv/.installed
fi
export HAYHOOKS_HOST="${HAYHOOKS_HOST:-127.0.0.1}" HAYHOOKS_PORT="${HAYHOOKS_PORT:-1416}"
export HAYHOOKS_PIPELINES_DIR="${HAYHOOKS_PIPELINES_DIR:-$PWD/served}"
export HAYHOOKS_DURABLE_MODE="${HAYHOOKS_DURABLE_MODE:-true}"  # jobs on, deployment routes off (see README)
exec .venv/bin/image-generation-server
