#!/usr/bin/env bash
# Create .venv with pinned dependencies (CPU torch 2.13.0) and install the project with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
# Already set up from this pyproject.toml (the stamp holds its hash): nothing to install, works offline.
STAMP=.venv/.spec-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
[ -f "$STAMP" ] && exit 0
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
rm -f .venv/.spec-setup-* && touch "$STAMP"
