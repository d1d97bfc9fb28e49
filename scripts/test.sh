#!/usr/bin/env bash
# Set everything up, then run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests -n 2 "$@"  # two workers (pytest-xdist): in one process the suite takes ~13 min on the 2-core box
