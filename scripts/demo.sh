#!/usr/bin/env bash
# The demo: set up, train the tiny MM-Rec on the bundled Shakespeare (a few minutes on 2 CPU
# cores), then generate from the checkpoint. Extra arguments go to `mmrec train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mmrec train --config tiny --out runs/demo --force "$@"
.venv/bin/mmrec generate --ckpt runs/demo --prompt "ROMEO:" --tokens 120
