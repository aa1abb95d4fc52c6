#!/usr/bin/env bash
# Creates a TPU VM slice (one or more hosts) for pdpo_jax.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR=${TPU_ACCELERATOR:-v4-32}
RUNTIME=${TPU_RUNTIME:-tpu-ubuntu2204-base}
SPOT=0

usage() {
  cat <<USAGE
usage: tpu/create.sh [--accelerator-type TYPE] [--version RUNTIME] [--spot] [common flags]

  --accelerator-type TYPE  slice type, e.g. v4-8 (1 host), v4-32 (4 hosts), v5p-64
                           (default \$TPU_ACCELERATOR or v4-32)
  --version RUNTIME        TPU software version matching the type, e.g. tpu-ubuntu2204-base for
                           v4/v5p (default \$TPU_RUNTIME or tpu-ubuntu2204-base)
  --spot                   a Spot (preemptible) slice
$COMMON_HELP
USAGE
}

while [[ $# -gt 0 ]]; do
  if common_flag "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --accelerator-type) ACCELERATOR=${2:?--accelerator-type needs a value}; shift 2 ;;
    --version) RUNTIME=${2:?--version needs a value}; shift 2 ;;
    --spot) SPOT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

location_flags
command=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}"
         --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
if [[ $SPOT == 1 ]]; then
  command+=(--spot)
fi
run "${command[@]}"
