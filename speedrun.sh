#!/usr/bin/env bash
# The reference's record speedrun on one 8-GPU node (nanochat 92d63d4 runs/speedrun.sh): the stack with
# Docker, then the current recipe's pipeline (shards, tokenizer, base d24 at 8 tokens per parameter on 8
# processes, SFT from base, the evals and the report card), followed here to its end.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

usage() {
  cat <<'USAGE'
Usage: ./speedrun.sh [--run=NAME]

Needs 8 NVIDIA GPUs, Docker with the NVIDIA Container Toolkit, and API_TOKEN in .env. Starts the stack
(docker compose up), submits the "d24 8×GPU speedrun" preset (services/web/web/static/presets.json)
and follows every stage's log. Watch it in the web UI too: http://localhost:8080/#/jobs. The classic
recipe (base d20 → mid → SFT → RL) is the "d20 classic 8×GPU" preset, or ./train.sh all --depth=20.
USAGE
}

run=d24
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --run=*) run="${1#--run=}" ;;
  "") ;;
  *) usage >&2; die "unknown option '$1'" ;;
esac
need_gpus 8
need_docker
compose up -d --build --wait
spec=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["d24 8×GPU speedrun"]["spec"]; s["run"]=sys.argv[2]; print(json.dumps(s))' \
  services/web/web/static/presets.json "$run")
run_job "$spec"
