#!/usr/bin/env bash
# Runs the whole test suite on CPU (what CI runs), with the 25 slowest tests listed at the end.
# `--fast` leaves out the tests that need the bundled model, start processes, compile for TPU or
# drive a browser (markers given in tests/conftest.py), and runs the rest in one worker per core
# (PDPO_TEST_WORKERS sets another count; a module's tests stay in one worker, so its fixtures are
# built once) with a small example budget for the property tests (PDPO_HYPOTHESIS_PROFILE=fast).
# Other arguments go to pytest (e.g. scripts/test.sh -k losses, scripts/test.sh --fast -x).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export JAX_PLATFORMS=cpu
workers=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    workers=(-n "${PDPO_TEST_WORKERS:-$(nproc)}" --dist loadfile)
    export PDPO_HYPOTHESIS_PROFILE="${PDPO_HYPOTHESIS_PROFILE:-fast}"  # property tests: a small example budget
  fi
done
exec python -m pytest -q --durations=25 "${workers[@]}" "$@"
