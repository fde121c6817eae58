#!/usr/bin/env bash
# Smoke test of the compose deployment on a machine with a Docker engine: build, start, wait until healthy,
# fetch a PNG with curl, check it, tear down. Needs HF_TOKEN or IMAGE_GENERATION_ENDPOINT (shell or .env).
#   HF_TOKEN=hf_... scripts/compose-smoke.sh
#   PROFILE=local SERVICE=hayhooks-local PORT=1417 scripts/compose-smoke.sh   # the diffusers backend on a GPU
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICE="${SERVICE:-hayhooks}"
PORT="${PORT:-1416}"
TIMEOUT="${TIMEOUT:-300}"
compose=(docker compose)
[ -n "${PROFILE:-}" ] && compose+=(--profile "$PROFILE")

if [ -z "${HF_TOKEN:-}" ] && [ -z "${IMAGE_GENERATION_ENDPOINT:-}" ] \
  && ! grep -Eq '^(HF_TOKEN|IMAGE_GENERATION_ENDPOINT)=.+' .env 2>/dev/null && [ "$SERVICE" = hayhooks ]; then
  echo "set HF_TOKEN or IMAGE_GENERATION_ENDPOINT (in the shell or in .env)" >&2
  exit 2
fi

out="$(mktemp -d)"
cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then "${compose[@]}" logs --tail 100 "$SERVICE" || true; fi
  "${compose[@]}" down --remove-orphans
  rm -rf "$out"
  exit "$status"
}
trap cleanup EXIT

"${compose[@]}" up -d --build "$SERVICE"

container="$("${compose[@]}" ps -q "$SERVICE")"
echo "waiting for $SERVICE to be healthy (up to ${TIMEOUT}s)"
deadline=$((SECONDS + TIMEOUT))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; do
  if [ "$SECONDS" -ge "$deadline" ] || [ "$(docker inspect -f '{{.State.Running}}' "$container")" != true ]; then
    echo "$SERVICE did not become healthy: $(docker inspect -f '{{.State.Health.Status}}' "$container")" >&2
    exit 1
  fi
  sleep 2
done

curl -fsS --max-time 300 -X POST "http://localhost:${PORT}/image_generation/run" \
  -H 'Content-Type: application/json' \
  -d '{"prompt": "A cat sitting on a rainbow", "width": 512, "height": 512, "seed": 42}' \
  -o "$out/image.png"
magic="$(head -c 8 "$out/image.png" | od -An -tx1 | tr -d ' \n')"
size="$(wc -c < "$out/image.png")"
if [ "$magic" != 89504e470d0a1a0a ] || [ "$size" -lt 1000 ]; then
  echo "not a PNG: magic $magic, $size bytes" >&2
  exit 1
fi
echo "OK: $size-byte PNG from $SERVICE"

# The read-only root held: nothing but /tmp was written.
if "${compose[@]}" exec -T "$SERVICE" sh -c 'touch /opt/pipelines/x 2>/dev/null || touch /home/app/x 2>/dev/null'; then
  echo "the root filesystem is writable" >&2
  exit 1
fi
