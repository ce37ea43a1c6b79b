#!/usr/bin/env bash
# The test suite, here (make test) or inside a throwaway container of the Python image.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

usage() {
  cat <<'USAGE'
Usage: ./test.sh [--in-docker]

Runs the whole suite as CI does (make test: set-up, then pytest). --in-docker runs it inside a fresh
python:3.11-bookworm container with this checkout mounted, so nothing is installed on this machine.
USAGE
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --in-docker)
    need_docker
    exec "$DOCKER" run --rm -v "$PWD:/src" -w /src -e CI="${CI:-}" python:3.11-bookworm \
      bash -c 'apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null && make test'
    ;;
  "") ;;
  *) usage >&2; die "unknown option '$1'" ;;
esac
exec make test
