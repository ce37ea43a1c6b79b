#!/usr/bin/env bash
# Build the stack's images (GPU by default, CPU torch with --cpu).
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

usage() {
  cat <<'USAGE'
Usage: ./build.sh [--cpu] [SERVICE ...]

Builds the images of compose.yaml (all services, or the ones named: api worker inference web trainer).
--cpu builds CPU torch into the ML images (compose.cpu.yaml), for machines without an NVIDIA GPU.
USAGE
}

services=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --cpu) export NANOCHAT_CPU=1 ;;
    -*) usage >&2; die "unknown option '$arg'" ;;
    *) services+=("$arg") ;;
  esac
done
need_docker
compose --profile tools build "${services[@]}"
