#!/usr/bin/env bash
# Set up, lint, and run the test suite (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
# The Triton kernels themselves, on CPU tensors through Triton's interpreter (on a GPU machine
# the run above already ran them on CUDA). The interpreter runs on one core: two workers took
# 502 s here against 948 s for one (2 cores, 2026-12-03).
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -n 2 --dist worksteal -m triton tests
fi
