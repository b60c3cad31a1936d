#!/usr/bin/env bash
# The demo pipeline under several seeds (bench, model, warm-up, SFT and GRPO all reseeded), then one table:
# average accuracy per variant and seed, and the gains the demo is judged by. One run on 400 items has
# +-5-point intervals; this says how much of a difference survives a change of seed.
#   bash scripts/demo_seeds.sh [--out DIR] [SEED ...]        (default: runs/demo-seeds, seeds 0 1)
# Each seed is a normal pipeline run in DIR/seed-N: rerunning resumes, finished seeds are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/demo-seeds
if [[ "${1:-}" == "--out" ]]; then out=$2; shift 2; fi
seeds=("$@")
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0 1)
bin=.venv/bin/audio-rft
[[ -x $bin ]] || bin=audio-rft
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for seed in "${seeds[@]}"; do
  overrides=()
  for stage in data base-model warmup sft grpo grpo-think; do overrides+=("$stage.seed=$seed"); done
  "$bin" run pipelines/demo.yaml --out "$out/seed-$seed" "${overrides[@]}"
done
python3 - "$out" "${seeds[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, seeds = Path(sys.argv[1]), sys.argv[2:]
rows = {}
for seed in seeds:
    report = json.loads((out / f"seed-{seed}" / "report.json").read_text())
    rows[seed] = {v["name"]: v["accuracy"]["average"] for v in report["variants"]}
names = list(next(iter(rows.values())))
print("\naverage accuracy (%) on the test split, per seed\n")
print("| seed | " + " | ".join(names) + " | grpo - base | sft - base | grpo - no-audio |")
print("|---" * (len(names) + 4) + "|")
for seed, acc in rows.items():
    gains = [acc["grpo"] - acc["base"], acc["sft"] - acc["base"], acc["grpo"] - acc["grpo-no-audio"]]
    print(f"| {seed} | " + " | ".join(f"{acc[n]:.2f}" for n in names) + " | " + " | ".join(f"{g:+.2f}" for g in gains) + " |")
EOF
