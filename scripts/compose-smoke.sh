#!/usr/bin/env bash
# The compose deployment's lifecycle against a real Docker engine, one step per argument; tests/test_compose.py runs
# these same steps. With no argument it runs them all, in order, and tears down even when one fails:
#   build     docker compose build
#   up        docker compose up -d --wait: the service (SCALE replicas of it) turns healthy (its own healthcheck)
#             within $TIMEOUT s
#   request   the README's curl through the published port answers a PNG of the requested size, the JSON variant an
#             image in JSON, the editing route an edited PNG; the runtime
#             deployment routes are refused; CORS refuses an origin not configured
#   hardening on the running container: uid != 0, a read-only root (/ and $HOME refuse writes, /tmp takes them),
#             no capabilities (effective, permitted, bounding) and no-new-privileges in every process, and no
#             compiler, no pip and no tests in the image
#   logs      docker compose logs hold no secret (HF_TOKEN, IMAGE_GENERATION_API_KEYS)
#   down      docker compose stop: the server shuts down gracefully on SIGTERM within its stop grace period; down
#   clean     docker compose down --volumes, quietly (what a failed run needs); prune this project's untagged images
# Examples:
#   HF_TOKEN=hf_... scripts/compose-smoke.sh                       # the real Hugging Face API
#   COMPOSE_FILE=docker-compose.yml:tests/compose.test.yml scripts/compose-smoke.sh   # the fake upstream, no token
#   PROFILE=local SERVICE=hayhooks-local WIDTH=256 HEIGHT=256 scripts/compose-smoke.sh   # diffusers backend
# Settings (environment): SERVICE [hayhooks], PROFILE, ENV_FILE [.env], TIMEOUT [300], WIDTH and HEIGHT [512],
# EXTRA_FIELDS (more JSON fields for the request, e.g. '"num_inference_steps": 4'), OUT_DIR (keeps image.png and
# compose.log), docker compose's own (COMPOSE_FILE, COMPOSE_PROJECT_NAME) and docker-compose.yml's (HAYHOOKS_PUBLISH).
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICE="${SERVICE:-hayhooks}"
TIMEOUT="${TIMEOUT:-300}"
WIDTH="${WIDTH:-512}"
HEIGHT="${HEIGHT:-512}"
compose=(docker compose)
if [ -n "${ENV_FILE:-}" ]; then compose+=(--env-file "$ENV_FILE"); fi
if [ -n "${PROFILE:-}" ]; then compose+=(--profile "$PROFILE"); fi
OUT_DIR="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"

fail() {
  echo "FAIL [$SERVICE]: $*" >&2
  exit 1
}
ok() { echo "ok [$SERVICE]: $*"; }
container() {
  local id
  id="$("${compose[@]}" ps -q "$SERVICE")"
  [ -n "$id" ] || fail "no running $SERVICE container"
  echo "$id"
}
in_container() { docker exec "$(container)" sh -c "$1"; }

step_build() {
  "${compose[@]}" build --with-dependencies "$SERVICE"
  ok "built"
}

step_up() {
  local start=$SECONDS
  if ! "${compose[@]}" up -d --wait --wait-timeout "$TIMEOUT" ${SCALE:+--scale "$SERVICE=$SCALE"} "$SERVICE"; then
    "${compose[@]}" ps -a >&2 || true
    "${compose[@]}" logs --no-color --tail 80 >&2 || true
    fail "not healthy within ${TIMEOUT}s"
  fi
  ok "healthy in $((SECONDS - start))s: $(docker inspect -f '{{.State.Health.Status}}' "$(container)")"
}

step_request() {
  local address url image="$OUT_DIR/image.png" ihdr body code path headers
  address="$("${compose[@]}" port "$SERVICE" 1416)"
  url="http://${address/0.0.0.0/localhost}"
  body="{\"prompt\": \"A cat sitting on a rainbow\", \"width\": $WIDTH, \"height\": $HEIGHT, \"seed\": 42"
  body+="${EXTRA_FIELDS:+, $EXTRA_FIELDS}}"
  curl -fsS --max-time 300 -X POST "$url/image_generation/run" \
    -H 'Content-Type: application/json' \
    -d "$body" \
    --output "$image" || fail "curl $url/image_generation/run"
  # The signature, then the IHDR chunk: width and height as 4-byte big-endian integers at offsets 16 and 20.
  ihdr="$(head -c 24 "$image" | od -An -v -tx1 | tr -d ' \n')"
  [ "${ihdr:0:16}" = 89504e470d0a1a0a ] || fail "not a PNG: ${ihdr:0:16}"
  [ "$((16#${ihdr:32:8}))x$((16#${ihdr:40:8}))" = "${WIDTH}x${HEIGHT}" ] ||
    fail "a $((16#${ihdr:32:8}))x$((16#${ihdr:40:8})) PNG, not ${WIDTH}x${HEIGHT}"
  ok "$(wc -c < "$image")-byte ${WIDTH}x${HEIGHT} PNG from $url"
  if [ "${PROFILE:-}" != local ]; then  # the JSON variant is the API backend's pipeline
    code="$(curl -sS -o "$OUT_DIR/json.json" -w '%{http_code}' --max-time 300 -X POST "$url/image_generation_json/run" \
      -H 'Content-Type: application/json' -d "{\"prompt\": \"json\", \"width\": $WIDTH, \"height\": $HEIGHT}")"
    [ "$code" = 200 ] && grep -q '"mime_type": *"image/png"' "$OUT_DIR/json.json" ||
      fail "the JSON variant answered $code: $(head -c 200 "$OUT_DIR/json.json")"
    ok "the JSON variant answers a PNG in JSON"
    curl -fsS --max-time 300 -X POST "$url/image_editing/run" -F "files=@$image;type=image/png" -F "prompt=A dog" \
      --output "$OUT_DIR/edit.png" || fail "curl $url/image_editing/run"
    [ "$(head -c 8 "$OUT_DIR/edit.png" | od -An -v -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || fail "the edit is no PNG"
    ok "the editing route answers an edited PNG"
  fi
  for path in /deploy_files /deploy-yaml /undeploy/image_generation; do
    code="$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$url$path" -H 'Content-Type: application/json' -d '{}')"
    [ "$code" = 404 ] || [ "$code" = 405 ] || fail "POST $path answered $code: runtime deployment is on"
  done
  ok "runtime deployment routes refused"
  headers="$(curl -sS -o /dev/null -D - -X OPTIONS "$url/image_generation/run" -H 'Origin: https://evil.example' \
    -H 'Access-Control-Request-Method: POST')"
  if grep -qi '^access-control-allow-origin' <<< "$headers"; then
    fail "CORS lets any origin call the API"
  fi
  ok "CORS refuses an origin it was not given"
}

step_hardening() {
  local id uid out
  id="$(container)"
  uid="$(in_container 'id -u')"
  [ "$uid" != 0 ] || fail "runs as root"
  ok "uid $uid"
  for path in /probe '$HOME/probe'; do
    if out="$(in_container "touch $path" 2>&1)"; then fail "wrote $path: no read-only root"; fi
    [[ "$out" == *"Read-only file system"* ]] || fail "writing $path failed, but not on a read-only root: $out"
  done
  in_container 'touch /tmp/probe && rm /tmp/probe' || fail "/tmp is not writable"
  ok "read-only root; /tmp writable"
  # Every process in the container, the server, the init and this shell included.
  out="$(in_container 'grep -h -E "^(CapEff|CapPrm|CapBnd|NoNewPrivs):" /proc/[0-9]*/status' | sort | uniq -c)"
  if grep -E 'Cap(Eff|Prm|Bnd):' <<< "$out" | grep -qv '0000000000000000'; then fail "capabilities left: $out"; fi
  if grep 'NoNewPrivs:' <<< "$out" | grep -qv 'NoNewPrivs:[[:space:]]*1'; then fail "no_new_privs unset: $out"; fi
  [[ "$(docker inspect -f '{{json .HostConfig.SecurityOpt}}' "$id")" == *no-new-privileges* ]] ||
    fail "no-new-privileges is not in the container's security options"
  ok "no capabilities, no-new-privileges"
  out="$(in_container 'for tool in cc gcc g++ c++ clang make as ld pip pip3 pytest; do command -v $tool; done;
    find / -xdev \( -path "*-packages/pip" -o -path "*-packages/pytest" -o -name fake_upstream.py \
      -o -name test_compose.py -o -name compose-smoke.sh \) -print 2>/dev/null' || true)"
  [ -z "$out" ] || fail "the image holds build or test tools: $out"
  ok "no compiler, pip or tests in the image"
}

step_logs() {
  local log="$OUT_DIR/compose.log" secret keys="${IMAGE_GENERATION_API_KEYS:-}"
  "${compose[@]}" logs --no-color > "$log"
  [ -s "$log" ] || fail "docker compose logs is empty"
  for secret in ${HF_TOKEN:-} ${keys//,/ }; do
    if grep -qF -- "$secret" "$log"; then fail "a secret is in docker compose logs"; fi
  done
  ok "$(wc -l < "$log") log lines, no secret"
}

step_down() {
  local id grace start elapsed code
  id="$(container)"
  grace="$(docker inspect -f '{{.Config.StopTimeout}}' "$id")"
  start="$(date +%s%N)"
  "${compose[@]}" stop "$SERVICE"
  elapsed="$((($(date +%s%N) - start) / 1000000))"
  code="$(docker inspect -f '{{.State.ExitCode}}' "$id")"
  # Uvicorn shuts down gracefully on SIGTERM, then re-raises it: 143. A SIGKILL at the grace period's end: 137.
  [ "$code" = 0 ] || [ "$code" = 143 ] || fail "exit code $code after SIGTERM"
  [ "$elapsed" -lt "$((grace * 1000))" ] || fail "stop took ${elapsed} ms, the grace period is ${grace}s"
  docker logs "$id" 2>&1 | grep "Application shutdown complete" > /dev/null || fail "no graceful shutdown in the log"
  step_clean
  ok "shut down gracefully on SIGTERM in ${elapsed} ms (grace period ${grace}s, exit code $code); down"
}

step_clean() {
  local service
  "${compose[@]}" down --volumes --remove-orphans --timeout 5 2> /dev/null
  # This project's images that rebuilds left untagged (the build cache keeps their layers).
  for service in $("${compose[@]}" --profile '*' config --services); do
    docker image prune --force --filter "label=com.docker.compose.service=$service" > /dev/null
  done
}

if [ "$#" -eq 0 ]; then
  trap '[ "$?" -eq 0 ] || step_clean' EXIT
  set -- build up request hardening logs down
fi
for step in "$@"; do
  case "$step" in
    build | up | request | hardening | logs | down | clean) "step_$step" ;;
    *) fail "unknown step $step (build, up, request, hardening, logs, down, clean)" ;;
  esac
done
