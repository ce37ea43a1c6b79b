#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one run on an NVIDIA machine measures and proves what the CPU
# machines this project is built on cannot. Under 10 minutes on one H100/H200; a line per part, one JSON
# line at the end.
#
#   bench/gpu_check.sh prepare          # on a machine with PyPI: the wheels a bare CUDA Python lacks into
#                                       # .whl/ (Python 3.12, x86-64), the data kit's shards into
#                                       # .gpu_check/data/ (both git-ignored, to carry to the GPU machine)
#   bench/gpu_check.sh [--out DIR]      # on the GPU machine: .venv's python when `make setup` made one,
#                                       # else python3 (with CUDA torch); .whl/ goes into a temp folder
#   bench/gpu_check.sh --smoke          # every part tiny on the CPU (what the test suite runs)
#   bench/gpu_check.sh --parts d12 inference   # only these parts (a rerun of what failed)
set -euo pipefail
cd "$(dirname "$0")/.."

# What the trainer, the model server and the test suite's conftest import beyond what a CUDA Python
# image has (torch, triton, numpy, pyarrow, tiktoken, safetensors, httpx, huggingface-hub, pytest, ...).
WHEELS=(rustbpe kernels tomlkit pydantic pydantic-core pydantic-settings python-dotenv annotated-types
  typing-inspection fastapi starlette uvicorn httptools prometheus-client redis)

prepare() {
  local pins
  # The versions this checkout's .venv runs (make setup), so both machines run the same code.
  read -r -a pins <<<"$(.venv/bin/python -c 'import sys; from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))' "${WHEELS[@]}")"
  rm -rf .whl && mkdir -p .whl .gpu_check/data
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${pins[@]}"
  local kit="${NANOCHAT_DATA_DIR:-../shared/data}"
  rm -rf .gpu_check/data/pretrain && cp -r "$kit/pretrain" .gpu_check/data/
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")" && touch "$exclude"
  for ignored in /.whl/ /.gpu_check/; do
    grep -qxF "$ignored" "$exclude" || echo "$ignored" >>"$exclude"
  done
  echo "ready to carry: .whl ($(find .whl -name '*.whl' | wc -l) wheels) and .gpu_check"
}

if [ "${1:-}" = prepare ]; then
  prepare
  exit 0
fi
python=.venv/bin/python
[ -x "$python" ] || python=python3
if [ "$python" = python3 ] && [ -d .whl ]; then  # a bare CUDA Python: the carried wheels complete it
  site=$(mktemp -d)
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD/services/trainer:$PWD/services/jobs:$PWD/services/inference${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -d .gpu_check/data/pretrain ]; then export NANOCHAT_DATA_DIR="$PWD/.gpu_check/data"; fi
exec "$python" bench/gpu_check.py "$@"
