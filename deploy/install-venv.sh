#!/usr/bin/env bash
# Installs the service for running (no dev extras) into a virtual environment, with CPU-only torch.
#
# The Dockerfile's build stage runs it, and CI can run the same steps outside Docker (see docs/deployment.md),
# so what the image installs is what a green check has installed.
#
# Usage: bash deploy/install-venv.sh VENV_DIR [torch|project|all]
#   torch    only torch + torchvision (the image caches this heavy layer apart from the project's source)
#   project  the project from the current directory, `pip install '.[tracing]'`, with its remaining dependencies
#            (the tracing extra is small and stays off unless OTEL_EXPORTER_OTLP_ENDPOINT is set)
#   all      both (default)
# Environment:
#   TORCH_INDEX_URL  index for torch/torchvision only (default: PyTorch's CPU wheels; the default Linux wheels
#                    bring ~4 GB of CUDA libraries and Triton). Empty = the ordinary index, e.g. where only PyPI
#                    is reachable.
#   TORCH_PACKAGES   requirement specifiers to pin them (default "torch torchvision": the newest CPU build).
#   PYTHON           interpreter that creates the venv (default python3).
set -euo pipefail

venv=${1:?usage: install-venv.sh VENV_DIR [torch|project|all]}
step=${2:-all}
torch_index_url=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
read -r -a torch_packages <<<"${TORCH_PACKAGES:-torch torchvision}"

case "$step" in torch | project | all) ;; *)
  echo "install-venv.sh: unknown step '$step' (torch, project or all)" >&2
  exit 2
  ;;
esac

if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --no-input)

if [ "$step" != project ]; then
  "${pip[@]}" --upgrade pip
  if [ -n "$torch_index_url" ]; then
    # --index-url for these two only: everything else comes from the ordinary index in the next step.
    "${pip[@]}" --index-url "$torch_index_url" "${torch_packages[@]}"
  else
    "${pip[@]}" "${torch_packages[@]}"
  fi
fi

if [ "$step" != torch ]; then
  # torch is already satisfied, so pip keeps the CPU build instead of fetching the default (CUDA) one.
  "${pip[@]}" '.[tracing]'
fi
