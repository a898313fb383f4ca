#!/usr/bin/env bash
# Run the test suite (after deploy/setup.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export TMPDIR="${TMPDIR:-$PWD/.tmp}" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
mkdir -p "$TMPDIR"
exec .venv/bin/python -m pytest -q "$@"
