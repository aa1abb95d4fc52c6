#!/usr/bin/env bash
# The small real experiment of docs/results.md: SFT -> pseudo-preferences -> DPO -> DNLI, then the
# "w/o shuffle" ablation from the same SFT model (its SFT stage is reused, not retrained).
# Usage: scripts/run_small_experiment.sh DATA_DIR [RUN_ROOT]
#   DATA_DIR holds personachat/valid_self_original_no_cands.txt and dnli/valid_{havenot,likedislike}.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(cd "${1:?usage: scripts/run_small_experiment.sh DATA_DIR [RUN_ROOT]}" && pwd)
ROOT=${2:-runs}
CONFIG=$(mktemp --suffix=.yaml)
trap 'rm -f "$CONFIG"' EXIT
sed "s#PDPO_DATA#$DATA#g" configs/experiments/staged-small.yaml > "$CONFIG"
SHUFFLED="$ROOT/staged-small"
UNSHUFFLED="$SHUFFLED-wo-shuffle"  # the variant file appends -wo-shuffle to run_dir
time pdpo pipeline --config "$CONFIG" run_dir="$SHUFFLED"
# The ablation differs from the start of make-prefs on: share the finished SFT stage.
mkdir -p "$UNSHUFFLED"
[ -e "$UNSHUFFLED/sft" ] || cp -r "$SHUFFLED/sft" "$UNSHUFFLED/sft"
[ -e "$UNSHUFFLED/eval/sft" ] || { mkdir -p "$UNSHUFFLED/eval"; cp -r "$SHUFFLED/eval/sft" "$UNSHUFFLED/eval/sft"; }
time pdpo pipeline --config "$CONFIG" --config configs/paper/variants/wo-shuffle.yaml run_dir="$SHUFFLED" \
  --stages make-prefs,dpo,eval-dpo,summary
python -m pdpo_jax.evaluate.report dnli "$SHUFFLED/eval/sft/dnli.json" "$SHUFFLED/eval/dpo/dnli.json" \
  "$UNSHUFFLED/eval/dpo/dnli.json" --out "$ROOT/staged-small-comparison"
# The same three models with intervals and paired tests against SFT (docs/dnli.md).
pdpo results --model sft="$SHUFFLED/eval/sft/dnli.json" --model pseudo-dpo="$SHUFFLED/eval/dpo/dnli.json" \
  --model wo-shuffle="$UNSHUFFLED/eval/dpo/dnli.json" --reference sft --out "$ROOT/staged-small-results" \
  --curves sft="$SHUFFLED/sft/metrics.jsonl" --curves pseudo-dpo="$SHUFFLED/dpo/metrics.jsonl" \
  --curves wo-shuffle="$UNSHUFFLED/dpo/metrics.jsonl"
