#!/usr/bin/env bash
# The test command: lint and format check, then the whole suite (viewer tests under Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m ruff format --check .
# pytest-xvfb starts a virtual display for the napari viewer tests; no screen needed.
exec $PY -m pytest -q -p no:cacheprovider "$@"
