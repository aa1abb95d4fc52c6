#!/usr/bin/env bash
# Runs the whole test suite on CPU. Extra arguments go to pytest (e.g. scripts/test.sh -k losses).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export JAX_PLATFORMS=cpu
exec python -m pytest -q "$@"
