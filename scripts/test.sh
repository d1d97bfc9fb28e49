#!/usr/bin/env bash
# Set everything up, then run the test suite on CPU.
# With arguments, they replace the default target (`bash scripts/test.sh tests/test_x.py -n 0`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ "$#" -eq 0 ]; then
  set -- tests -n 2 --dist loadgroup  # two workers (pytest-xdist): in one process the suite takes ~13 min on the 2-core box
fi
python -m pytest "$@"
