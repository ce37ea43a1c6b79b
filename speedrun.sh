#!/usr/bin/env bash
# The reference recipe on one 8-GPU node: the stack with Docker, then the d20 pipeline (shards,
# tokenizer, base pretraining on 8 processes, midtraining, SFT, RL, the evals and the report card),
# followed here to its end.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

usage() {
  cat <<'USAGE'
Usage: ./speedrun.sh [--run=NAME]

Needs 8 NVIDIA GPUs, Docker with the NVIDIA Container Toolkit, and API_TOKEN in .env. Starts the stack
(docker compose up), submits the "d20 8×GPU speedrun" preset (services/web/web/static/presets.json)
and follows every stage's log. Watch it in the web UI too: http://localhost:8080/#/jobs.
USAGE
}

run=d20
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --run=*) run="${1#--run=}" ;;
  "") ;;
  *) usage >&2; die "unknown option '$1'" ;;
esac
need_gpus 8
need_docker
compose up -d --build --wait
spec=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["d20 8×GPU speedrun"]["spec"]; s["run"]=sys.argv[2]; print(json.dumps(s))' \
  services/web/web/static/presets.json "$run")
run_job "$spec"
