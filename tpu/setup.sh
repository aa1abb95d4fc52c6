#!/usr/bin/env bash
# Puts pdpo_jax on every worker of a TPU VM slice: the code (a copy of this checkout's HEAD, or a
# git clone), a virtual environment with our package and jax[tpu] at the version we pin, the data
# sets, and optionally a Cloud Storage bucket mounted at the same path on every worker for reading
# data. Run directories do not need a mount: tpu/launch.sh --run-dir gs://BUCKET/... writes there directly.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL=""
REF=main
FETCH_DATA=1
BUCKET=""

usage() {
  cat <<USAGE
usage: tpu/setup.sh [--repo URL [--ref REF]] [--no-data] [--mount-bucket BUCKET] [common flags]

  --repo URL            git clone URL on every worker (default: copy this checkout's HEAD)
  --ref REF             branch or tag to clone (default main)
  --no-data             skip \`pdpo data download\` on the workers
  --mount-bucket NAME   mount gs://NAME at /mnt/NAME on every worker with gcsfuse, for reading data
                        (not for run directories: give tpu/launch.sh --run-dir gs://NAME/runs/...)
$COMMON_HELP
USAGE
}

while [[ $# -gt 0 ]]; do
  if common_flag "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --repo) REPO_URL=${2:?--repo needs a value}; shift 2 ;;
    --ref) REF=${2:?--ref needs a value}; shift 2 ;;
    --no-data) FETCH_DATA=0; shift ;;
    --mount-bucket) BUCKET=${2:?--mount-bucket needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

# The TPU build of jax must be the version the package pins, or pip would replace one with the other.
JAX_VERSION=$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "$REPO_ROOT/requirements.lock")
[[ -n $JAX_VERSION ]] || die "no jax==VERSION line in $REPO_ROOT/requirements.lock"

# 1. the code
if [[ -n $REPO_URL ]]; then
  on_all_workers "rm -rf $REMOTE_DIR && git clone --depth 1 --branch $(printf %q "$REF") $(printf %q "$REPO_URL") $REMOTE_DIR"
else
  TARBALL=${TMPDIR:-/tmp}/pdpo_jax-$$.tar.gz
  trap 'rm -f "$TARBALL"' EXIT
  run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=pdpo_jax/ -o "$TARBALL" HEAD
  location_flags
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:pdpo_jax.tar.gz" "${LOCATION[@]}" --worker=all
  on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf pdpo_jax.tar.gz -C $REMOTE_DIR --strip-components=1 && rm pdpo_jax.tar.gz"
fi

# 2. the environment (python3-venv is missing from some TPU VM images)
on_all_workers "(python3 -c 'import ensurepip' 2>/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q python3-venv)) && python3 -m venv $VENV && $VENV/bin/pip install -q -U pip && $VENV/bin/pip install -q -e $REMOTE_DIR && $VENV/bin/pip install -q 'jax[tpu]==$JAX_VERSION'"

# 3. the data, on every host (each reads the files and feeds its own rows)
if [[ $FETCH_DATA == 1 ]]; then
  on_all_workers "cd $REMOTE_DIR && ../$VENV/bin/pdpo data download --out data --quiet"
fi

# 4. a bucket mounted for reading data (run directories go to gs:// directly, not through the mount)
if [[ -n $BUCKET ]]; then
  on_all_workers "command -v gcsfuse >/dev/null || { echo 'gcsfuse is not installed on this worker (see tpu/README.md)' >&2; exit 1; }; sudo mkdir -p /mnt/$BUCKET && sudo chown \$(id -u):\$(id -g) /mnt/$BUCKET && (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET)"
fi

# 5. every worker sees the whole slice
on_all_workers "$VENV/bin/python -c 'import jax; print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"sees\", jax.device_count(), \"devices\")'"
