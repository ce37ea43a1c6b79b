#!/usr/bin/env bash
# `make setup`: idempotent set-up on a fresh Debian/Ubuntu machine with Python 3.11+.
# Creates .venv when missing, installs torch (CPU build unless a GPU is present), the job protocol package and the five services
# in editable mode and the test tools, and redis-server through apt when it is missing. Nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "nanochat-stack needs Python 3.11 or newer ('$python' is $("$python" --version 2>&1))." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

# Re-install only when a dependency list changed: a second `make setup` takes a second.
stamp=.venv/.setup-stamp
fingerprint=$(cat services/*/pyproject.toml requirements-dev.txt scripts/install_torch.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
  PYTHON=.venv/bin/python scripts/install_torch.sh
  .venv/bin/python -m pip install --quiet \
    -e services/jobs -e services/trainer -e services/worker -e services/api -e services/inference -e services/web \
    -r requirements-dev.txt
  echo "$fingerprint" > "$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing redis-server with apt"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: install it (e.g. 'sudo apt-get install redis-server') and run 'make setup' again." >&2
    exit 1
  fi
fi
echo "setup ok: .venv ready, $(redis-server --version | cut -d' ' -f1-3)"
