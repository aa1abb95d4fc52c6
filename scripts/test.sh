#!/usr/bin/env bash
# Runs the whole test suite on CPU (what CI runs), with the 25 slowest tests listed at the end, in
# one worker per core (PDPO_TEST_WORKERS sets another count, 1 runs in this process, e.g. for
# --pdb; a module's tests stay in one worker, so its fixtures are built once, and the modules with
# the most heavy tests start first).
# `--fast` leaves out the tests that need the bundled model, start processes, compile for TPU or
# drive a browser (markers given in tests/conftest.py), and gives the property tests a small example
# budget (PDPO_HYPOTHESIS_PROFILE=fast). Other arguments go to pytest
# (e.g. scripts/test.sh -k losses, scripts/test.sh --fast -x, scripts/test.sh tests/test_config.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export JAX_PLATFORMS=cpu
# Huge pages for the host arrays, as every `pdpo` command takes them (pdpo_jax/huge_pages.py): the
# in-process tests get them too, and the commands the tests start need not start themselves again.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    export PDPO_HYPOTHESIS_PROFILE="${PDPO_HYPOTHESIS_PROFILE:-fast}"
  fi
done
workers=${PDPO_TEST_WORKERS:-$(nproc)}
# PyTorch (the transformers references) and BLAS get one worker's share of the cores: with more
# threads, workers spin-wait on each other's cores (a greedy decode of the bundled model beside
# another worker took 130 CPU seconds at 2 threads, 8 at 1).
cores_per_worker=$(( $(nproc) / workers ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores_per_worker > 0 ? cores_per_worker : 1 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then
  # modules in the order tests/conftest.py gives them (the heaviest first), not by test count
  parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
exec python -m pytest -q --durations=25 "${parallel[@]}" "$@"
