#!/usr/bin/env bash
# Set everything up, then run `python main.py` on the embedded default (extra args are Hydra overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python main.py "$@"
