#!/usr/bin/env bash
# Run the test suite (after deploy/setup.sh). With arguments: one pytest run with them.
# Without: one pytest process per package group, so the memory that vLLM engines, models and local
# Ray clusters leave in a test process is returned between groups (a single process of the whole suite
# ran out of memory forking Ray late in the run on a 24 GiB machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export TMPDIR="${TMPDIR:-$PWD/.tmp}" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
mkdir -p "$TMPDIR"
pytest=(.venv/bin/python -m pytest -q)
if [ $# -gt 0 ]; then
  exec "${pytest[@]}" "$@"
fi

groups=("tests/models tests/rewards tests/curriculum tests/data" "tests/actors" "tests/learner" "tests/deploy" "tests/e2e")
failed=0
empty=0
for group in "${groups[@]}"; do
  echo "== pytest $group"
  # shellcheck disable=SC2086
  "${pytest[@]}" $group
  code=$?
  case "$code" in
    0) ;;
    5) empty=$((empty + 1)) ;;
    *) failed=$code ;;
  esac
done
[ "$failed" -ne 0 ] && exit "$failed"
[ "$empty" -eq "${#groups[@]}" ] && exit 5  # no test ran at all
exit 0
