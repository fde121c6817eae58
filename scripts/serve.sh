#!/usr/bin/env bash
# Set up (once) and run the service on http://127.0.0.1:1416 (HAYHOOKS_HOST/HAYHOOKS_PORT change it). Settings come
# from the environment (docs/configuration.md).
#
#   ./scripts/serve.sh           # images from Hugging Face (HF_TOKEN), your endpoint, or the local backend
#   ./scripts/serve.sh --demo    # no token, no GPU: a stand-in upstream that draws labelled test patterns
#
# The project is installed into .venv the first time, with the extras the backend needs; a later backend's extras are
# added to what is there, so switching back and forth installs nothing more. SERVE_VENV=/path/to/venv runs from a
# virtualenv you manage instead, and installs nothing into it.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "serve.sh: $*" >&2; }

demo=false
for arg in "$@"; do
  case "$arg" in
    --demo) demo=true ;;
    *) say "unknown argument '$arg' (the only one is --demo)"; exit 2 ;;
  esac
done

venv="${SERVE_VENV:-.venv}"
if [ -z "${SERVE_VENV:-}" ]; then
  need=""
  [ "${IMAGE_GENERATION_BACKEND:-huggingface_api}" = "local" ] && need="local"
  have="$(cat .venv/.installed 2>/dev/null || true)"  # the extras installed so far, comma-separated
  extras="$(printf '%s\n' ${have//,/ } $need | sort -u | paste -sd, -)"
  if [ ! -x .venv/bin/image-generation-server ] || [ pyproject.toml -nt .venv/.installed ] || [ "$extras" != "$have" ]; then
    if [ ! -x .venv/bin/python ]; then
      say "creating the virtualenv .venv"
      python3 -m venv .venv
    fi
    say "installing the project into .venv${extras:+ with the extras [$extras]} (the first time takes a few minutes; pip's progress follows)"
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off --editable ".${extras:+[$extras]}"
    echo "$extras" > .venv/.installed
    say "installed"
  fi
fi

export HAYHOOKS_HOST="${HAYHOOKS_HOST:-127.0.0.1}" HAYHOOKS_PORT="${HAYHOOKS_PORT:-1416}"
export HAYHOOKS_PIPELINES_DIR="${HAYHOOKS_PIPELINES_DIR:-$PWD/served}"
export HAYHOOKS_DURABLE_MODE="${HAYHOOKS_DURABLE_MODE:-true}"  # jobs on, deployment routes off (docs/deployment.md)

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

if $demo; then
  url_file="$(mktemp)"
  "$venv/bin/python" -m image_generation_server.demo_upstream > "$url_file" &
  pids+=($!)
  until [ -s "$url_file" ]; do kill -0 "${pids[-1]}" || { say "the demo upstream did not start"; exit 1; }; sleep 0.1; done
  export IMAGE_GENERATION_ENDPOINT="$(head -n1 "$url_file")"
  rm -f "$url_file"
  unset HF_TOKEN HF_API_TOKEN HF_TOKEN_FILE  # the demo upstream needs none, and gets none
  say "DEMO mode: images are labelled test patterns from a stand-in upstream, not a model's work (README: Run it)"
fi

say "starting the server"
"$venv/bin/image-generation-server" &
pids+=($!)
server=$!
case "$HAYHOOKS_HOST" in 0.0.0.0 | "::") host=localhost ;; *) host="$HAYHOOKS_HOST" ;; esac
page="http://$host:$HAYHOOKS_PORT/"
"$venv/bin/python" - "$page" <<'EOF' &
import sys, time, urllib.request

page = sys.argv[1]
while True:
    try:
        with urllib.request.urlopen(page + "status", timeout=1):
            break
    except OSError:
        time.sleep(0.2)
print(f"serve.sh: up: open {page} (API docs: {page}docs; Ctrl+C stops it)", file=sys.stderr, flush=True)
EOF
pids+=($!)
wait "$server"
