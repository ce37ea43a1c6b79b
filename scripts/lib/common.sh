# shellcheck shell=bash
# Shared by the scripts at the repository root (sourced, not run): clear failures, Docker and GPU
# checks, the compose command, and submitting a job to the API and following it to its end.

DOCKER="${DOCKER:-docker}"  # the docker client to call (a test points it elsewhere)

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

need_docker() {
  command -v "$DOCKER" >/dev/null 2>&1 ||
    die "docker is not installed (https://docs.docker.com/engine/install/); without Docker, 'make up' runs the stack as local processes"
  "$DOCKER" compose version >/dev/null 2>&1 ||
    die "the docker compose plugin is missing (https://docs.docker.com/compose/install/linux/)"
  "$DOCKER" info >/dev/null 2>&1 || die "the Docker engine is not running, or this user may not use it"
}

need_gpus() {  # need_gpus N: at least N NVIDIA GPUs
  local count
  count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  [ "$count" -ge "$1" ] || die "needs $1 NVIDIA GPU(s), found ${count:-0} (nvidia-smi -L); on a CPU machine use --cpu where offered"
}

compose() {  # docker compose over compose.yaml, plus the CPU override when NANOCHAT_CPU=1
  local files=(-f compose.yaml)
  [ "${NANOCHAT_CPU:-0}" = 1 ] && files+=(-f compose.cpu.yaml)
  "$DOCKER" compose "${files[@]}" "$@"
}

setting() {  # setting NAME DEFAULT: from the environment, else .env, else DEFAULT
  local value="${!1:-}"
  if [ -z "$value" ] && [ -f .env ]; then
    value=$(sed -n "s/^$1=//p" .env | tail -n 1 | tr -d "\"'")
  fi
  echo "${value:-$2}"
}

api_url() { setting API_URL "http://localhost:$(setting API_PORT 8000)"; }

api() {  # api METHOD PATH [JSON]: the response body; fails with the API's own message
  local body status
  body=$(mktemp)
  status=$(curl -s -o "$body" -w '%{http_code}' -X "$1" "$(api_url)$2" \
    -H "Authorization: Bearer $(setting API_TOKEN '')" -H 'Content-Type: application/json' ${3:+--data "$3"}) ||
    { rm -f "$body"; die "the API at $(api_url) is unreachable: start the stack (docker compose up, or make up)"; }
  if [ "${status:0:1}" != 2 ]; then
    local message
    message=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])).get("detail"); print(d if isinstance(d, str) else "; ".join(".".join(map(str, e["loc"][1:])) + ": " + e["msg"] for e in d))' "$body" 2>/dev/null || cat "$body")
    rm -f "$body"
    die "the API answered $status: $message"
  fi
  cat "$body"
  rm -f "$body"
}

field() {  # field NAME: a top-level field of the JSON on stdin (lists joined by spaces)
  python3 -c 'import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print(" ".join(v) if isinstance(v, list) else v)' "$1"
}

follow() {  # follow JOB_ID: print its log as it streams, until the job ends
  local line ended=""
  curl -sSN "$(api_url)/jobs/$1/logs?follow=true" -H "Authorization: Bearer $(setting API_TOKEN '')" |
    while IFS= read -r line; do
      case "$line" in
        "event: end") ended=1 ;;
        data:*) [ -z "$ended" ] && printf '%s\n' "${line#data: }" ;;
      esac
    done
}

run_job() {  # run_job SPEC_JSON: submit, follow every stage's log, succeed only if it finished
  local job id stage status
  job=$(api POST /jobs "$1")
  id=$(field id <<<"$job")
  echo "submitted $(field kind <<<"$job") job $id (run $(field run <<<"$job")); web UI: http://localhost:$(setting WEB_PORT 8080)/#/jobs/$id"
  if [ "$(field kind <<<"$job")" = pipeline ]; then
    for stage in $(field stages <<<"$job"); do follow "$stage"; done
  else
    follow "$id"
  fi
  status=$(api GET "/jobs/$id" | field status)
  echo "job $id: $status"
  [ "$status" = finished ]
}
