#!/usr/bin/env bash
# Install torch==$TORCH_VERSION with the right build for this machine, and nothing else.
#   TORCH_VARIANT=auto (default): CUDA build when `nvidia-smi` sees a GPU, CPU build otherwise.
#   TORCH_VARIANT=cpu | cuda: force one (Docker builds have no GPU to look at).
#   TORCH_CUDA=cu130 (default) | cu126: the CUDA line of the CUDA build, from PyTorch's own index. cu130
#   needs an NVIDIA driver >= 580.65.06; cu126 runs on drivers >= 525.60.13 (up to Hopper, no Blackwell).
#   FLASH_ATTN_WHEEL=<url or path>: also install this prebuilt flash-attn wheel (CUDA only; it must
#   match the torch, CUDA and Python versions). Without it attention runs on PyTorch's SDPA.
#   TORCH_WHEELHOUSE=<folder>: look for the CPU wheel there first (offline image builds mount one).
# Plain `pip install torch` on Linux pulls the multi-GB CUDA build, which a CPU machine must never get.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
variant="${TORCH_VARIANT:-auto}"
cuda_line="${TORCH_CUDA:-cu130}"
python="${PYTHON:-python3}"

if [ "$variant" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
fi
case "$variant" in cpu | cuda) ;; *) echo "TORCH_VARIANT must be auto, cpu or cuda (got '$variant')" >&2; exit 2 ;; esac
case "$cuda_line" in cu126 | cu130) ;; *) echo "TORCH_CUDA must be cu126 or cu130 (got '$cuda_line')" >&2; exit 2 ;; esac
label=$variant
[ "$variant" = cpu ] || label="cuda, $cuda_line"

install_flash_attn() {
  if [ -n "${FLASH_ATTN_WHEEL:-}" ] && [ "$variant" = cuda ]; then
    "$python" -m pip install --no-deps "$FLASH_ATTN_WHEEL"
  fi
}

if "$python" - "$TORCH_VERSION" "$variant" "$cuda_line" <<'PY' 2>/dev/null; then
import sys, torch
version, variant, cuda_line = sys.argv[1:]
wanted_cuda = None if variant == "cpu" else f"{cuda_line[2:-1]}.{cuda_line[-1]}"  # cu130 -> 13.0
sys.exit(0 if torch.__version__.split("+")[0] == version and torch.version.cuda == wanted_cuda else 1)
PY
  echo "torch $TORCH_VERSION ($label) is already installed"
  install_flash_attn
  exit 0
fi

echo "Installing torch $TORCH_VERSION ($label build)"
if [ "$variant" = cuda ]; then
  "$python" -m pip install "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/$cuda_line"
elif "$python" -m pip install --no-index --no-deps ${TORCH_WHEELHOUSE:+--find-links "$TORCH_WHEELHOUSE"} \
  "torch==$TORCH_VERSION" >/dev/null 2>&1; then
  # A CPU wheel in a local wheelhouse (TORCH_WHEELHOUSE or pip's find-links) was found: fetch only its
  # small dependencies.
  "$python" -m pip install "torch==$TORCH_VERSION"
else
  "$python" -m pip install "torch==$TORCH_VERSION" \
    --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi
install_flash_attn
