#!/usr/bin/env bash
# `make setup`: idempotent set-up on a fresh Debian/Ubuntu machine with Python 3.11+.
# Creates .venv when missing, installs torch (CPU build unless a GPU is present), the job protocol package and the five services
# in editable mode and the test tools, the web UI's browser libraries (npm ci, pinned by its lockfile), and
# redis-server, chromium (the browser tests drive it) and a C/C++ compiler with Python's headers
# (torch.compile) through apt when they are missing. Nothing else.
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

# The web UI's libraries: again only when the lockfile changed.
web_stamp=services/web/node_modules/.setup-stamp
web_fingerprint=$(sha256sum services/web/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$web_stamp" 2>/dev/null)" != "$web_fingerprint" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "npm is missing: install Node.js 20 or newer (it fetches the web UI's libraries) and run 'make setup' again." >&2
    exit 1
  fi
  (cd services/web && npm ci --no-audit --no-fund --loglevel=error)
  echo "$web_fingerprint" > "$web_stamp"
fi

# System packages through apt when missing: redis-server (the queue), chromium (the browser tests), and
# what torch.compile builds kernels with at run time (a C/C++ compiler and Python's headers).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v g++ >/dev/null 2>&1 || missing+=(gcc g++)
.venv/bin/python -c 'import pathlib, sys, sysconfig
sys.exit(not (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").exists())' || missing+=(python3-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing ${missing[*]} with apt"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "${missing[*]} missing: install with 'sudo apt-get install ${missing[*]}' and run 'make setup' again." >&2
    exit 1
  fi
fi
echo "setup ok: .venv ready, $(redis-server --version | cut -d' ' -f1-3), $(g++ --version | head -1)"
