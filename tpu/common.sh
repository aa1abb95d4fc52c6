# shellcheck shell=bash
# Shared by create.sh, setup.sh and launch.sh: the TPU VM to talk to, and `run`, which prints every
# command it is given and (unless --dry-run) executes it. Defaults come from the environment so a
# shell can `export TPU_NAME=... TPU_ZONE=...` once.

TPU_NAME=${TPU_NAME:-pdpo-tpu}
TPU_ZONE=${TPU_ZONE:-us-central2-b}
TPU_PROJECT=${TPU_PROJECT:-}
REMOTE_DIR=${PDPO_REMOTE_DIR:-pdpo_jax}  # on every worker, relative to the home folder
VENV=${PDPO_VENV:-pdpo-venv}             # likewise
DRY_RUN=0
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $DRY_RUN == 0 ]]; then
    "$@"
  fi
}

# Handles the flags every script takes; returns 1 for a flag it does not know.
# Sets SHIFT to the number of arguments consumed.
common_flag() {
  SHIFT=1
  case "$1" in
    --name) TPU_NAME=${2:?--name needs a value}; SHIFT=2 ;;
    --zone) TPU_ZONE=${2:?--zone needs a value}; SHIFT=2 ;;
    --project) TPU_PROJECT=${2:?--project needs a value}; SHIFT=2 ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

location_flags() {
  LOCATION=(--zone="$TPU_ZONE")
  if [[ -n $TPU_PROJECT ]]; then
    LOCATION+=(--project="$TPU_PROJECT")
  fi
}

# Runs one shell command line on every worker of the slice at once.
on_all_workers() {
  location_flags
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

COMMON_HELP="  --name NAME        TPU VM name (default \$TPU_NAME or pdpo-tpu)
  --zone ZONE        zone (default \$TPU_ZONE or us-central2-b)
  --project PROJECT  Google Cloud project (default: gcloud's configured project)
  --dry-run          print the commands without running them"
