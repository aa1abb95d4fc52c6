#!/usr/bin/env bash
# Runs `pdpo pipeline` on every worker of a TPU VM slice at once, as one multi-host JAX program.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_DIR=""
DETACH=0

usage() {
  cat <<USAGE
usage: tpu/launch.sh CONFIG [KEY=VALUE ...] --run-dir DIR [--detach] [common flags]

  CONFIG         config file, relative to the repository on the workers (e.g. configs/paper/llama-2-7b.yaml)
  KEY=VALUE      config overrides passed to pdpo (e.g. sft.epochs=1 mesh.fsdp=32)
  --run-dir DIR  run directory every worker sees as the same folder: gs://BUCKET/runs/llama-2-7b
                 (Cloud Storage, used directly; the workers' service account needs write access), or
                 an NFS path. Not a gcsfuse mount: it has no locks and no atomic directory renames.
  --detach       start in the background on each worker; output goes to logs/launch-<time>.log
                 in the repository folder of each worker
$COMMON_HELP

Exit status 75 ("resume") from a worker: the run got SIGTERM (a preempted or spot slice), finished
its training step and saved a checkpoint; launch the same command again to continue.
USAGE
}

POSITIONAL=()
while [[ $# -gt 0 ]]; do
  if common_flag "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    --run-dir) RUN_DIR=${2:?--run-dir needs a value}; shift 2 ;;
    --detach) DETACH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown flag: $1" ;;
    *) POSITIONAL+=("$1"); shift ;;
  esac
done
[[ ${#POSITIONAL[@]} -ge 1 ]] || { usage >&2; die "missing CONFIG"; }
[[ -n $RUN_DIR ]] || { usage >&2; die "missing --run-dir (a folder shared by all workers)"; }
CONFIG=${POSITIONAL[0]}
OVERRIDES=("${POSITIONAL[@]:1}")

pdpo_args=(pipeline --config "$CONFIG" "run_dir=$RUN_DIR" "${OVERRIDES[@]}")
quoted=$(printf ' %q' "${pdpo_args[@]}")
# PDPO_DISTRIBUTED=1 makes every stage call jax.distributed.initialize(); on a TPU VM JAX finds the
# coordinator, the process count and this worker's index by itself.
program="PDPO_DISTRIBUTED=1 ../$VENV/bin/pdpo$quoted"
if [[ $DETACH == 1 ]]; then
  log="logs/launch-$(date +%Y%m%d-%H%M%S).log"
  on_all_workers "cd $REMOTE_DIR && mkdir -p logs && nohup env $program > $log 2>&1 < /dev/null & echo \"started on \$(hostname), log: $REMOTE_DIR/$log\""
else
  on_all_workers "cd $REMOTE_DIR && $program"
fi
