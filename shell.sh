#!/usr/bin/env bash
# A shell in the trainer image, with the stack's data volume at /data/nanochat.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

usage() {
  cat <<'USAGE'
Usage: ./shell.sh [--cpu] [COMMAND ...]

Opens bash (or runs COMMAND) in the trainer image with the data, tokenizers, checkpoints and reports
volume mounted, e.g. ./shell.sh python -m trainer.chat_cli --run d20 -p "Why is the sky blue?"
--cpu uses the CPU image (compose.cpu.yaml).
USAGE
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --cpu) export NANOCHAT_CPU=1; shift ;;
esac
need_docker
[ $# -gt 0 ] || set -- bash
compose run --rm trainer "$@"
