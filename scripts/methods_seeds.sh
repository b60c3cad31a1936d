#!/usr/bin/env bash
# pipelines/methods.yaml under several seeds (bench, model, warm-up, every method and the pairs reseeded), then
# one table: average accuracy per method and seed, each method's gain over the base and its difference to GRPO
# and to SFT with the paired 95% interval from that seed's report.
#   bash scripts/methods_seeds.sh [--out DIR] [SEED ...]        (default: runs/methods-seeds, seeds 0 1 2)
# Each seed is a normal pipeline run in DIR/seed-N: rerunning resumes, finished seeds are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/methods-seeds
if [[ "${1:-}" == "--out" ]]; then out=$2; shift 2; fi
seeds=("$@")
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0 1 2)
bin=.venv/bin/audio-rft
[[ -x $bin ]] || bin=audio-rft
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for seed in "${seeds[@]}"; do
  overrides=()
  for stage in data base-model warmup sft grpo pairs dpo kto orpo bnf; do overrides+=("$stage.seed=$seed"); done
  "$bin" run pipelines/methods.yaml --out "$out/seed-$seed" "${overrides[@]}"
done
python3 scripts/methods_table.py "$out" "${seeds[@]}"
