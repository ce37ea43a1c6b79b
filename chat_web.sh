#!/usr/bin/env bash
# Start the model server and the web UI (and what they need), then print where to chat.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

usage() {
  cat <<'USAGE'
Usage: ./chat_web.sh [--cpu]

Starts inference and web with Docker Compose (building them if needed) and prints the chat page's
address. Needs API_TOKEN in .env; --cpu serves on CPU (compose.cpu.yaml).
USAGE
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --cpu) export NANOCHAT_CPU=1 ;;
  "") need_gpus 1 ;;
  *) usage >&2; die "unknown option '$1'" ;;
esac
need_docker
compose up -d --build --wait inference web
echo "Chat at http://localhost:$(setting WEB_PORT 8080)/#/chat (the page asks once for API_TOKEN)"
