#!/usr/bin/env bash
# Create ./.venv and install the project with its dev tools. Idempotent.
# PyTorch is installed FIRST and pinned: an unpinned torch from PyPI is the multi-GB CUDA build.
# Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) where the CPU wheel is not found by plain pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" torch==2.13.0
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
"${pip[@]}" -e '.[dev]'
echo "setup: ready (.venv, torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
