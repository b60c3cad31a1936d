#!/usr/bin/env bash
# Evaluate every checkpoint of a training run: accuracy against step.
#
#   scripts/eval_checkpoints.sh RUN_DIR DATA [MODEL] [PROMPT]
#
#   RUN_DIR  an `audio-rft sft|grpo` output folder (a pipeline's DIR/<stage>) holding checkpoint-N/ and final/
#   DATA     a prepared benchmark folder (e.g. runs/r1-aqa/mmau, or runs/demo/data/test)
#   MODEL    base model for LoRA checkpoints (default: each adapter's adapter_config.json
#            base_model_name_or_path); full-weight checkpoints are loaded as they are
#   PROMPT   direct | answer | think (default: the run's prompt_mode from RUN_DIR/run.json or
#            the checkpoint's model card, else answer)
#
# Environment: OUT (default RUN_DIR/eval-by-step), BATCH_SIZE (16), MAX_NEW_TOKENS (32; 512 for think),
# LIMIT (only the first N items), DEVICE (auto), DTYPE (auto), AUDIO_RFT (the command, default audio-rft).
#
# For each checkpoint: `audio-rft infer` -> OUT/step-N.json, `audio-rft score --output` -> OUT/step-N.scored.json.
# Then OUT/accuracy_by_step.csv and .md (accuracy per task and on average, with a 95% bootstrap interval)
# and OUT/accuracy_by_step.png. Rerunning skips checkpoints already evaluated (and resumes a cut-off one),
# so it can follow a run in progress. Training keeps only the newest keep_checkpoints (default 3):
# set keep_checkpoints=0 to keep them all.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 2 || $# -gt 4 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 2; fi

RUN_DIR=${1%/}
DATA=$2
MODEL=${3:-}
PROMPT=${4:-}
OUT=${OUT:-$RUN_DIR/eval-by-step}
BATCH_SIZE=${BATCH_SIZE:-16}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-auto}
read -r -a CLI <<< "${AUDIO_RFT:-audio-rft}"
PYTHON=${PYTHON:-python}

die() { echo "eval_checkpoints.sh: $*" >&2; exit 2; }
[[ -d $RUN_DIR ]] || die "$RUN_DIR: no such folder"
[[ -f $DATA/data.jsonl ]] || die "$DATA: not a prepared dataset (no data.jsonl)"

# Checkpoints in step order: checkpoint-N by N, then final (its step from COMPLETE.json).
mapfile -t CHECKPOINTS < <(
  "$PYTHON" - "$RUN_DIR" <<'EOF'
import json, re, sys
from pathlib import Path
run = Path(sys.argv[1])
found = []
for path in run.iterdir():
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if (match or path.name == "final") and (path / "COMPLETE.json").is_file():
        step = int(match.group(1)) if match else json.loads((path / "COMPLETE.json").read_text()).get("step", 0)
        found.append((step, path.name != "final", path))
for step, _, path in sorted(found, key=lambda f: (f[0], f[1])):
    print(f"{step}\t{path}")
EOF
)
[[ ${#CHECKPOINTS[@]} -gt 0 ]] || die "$RUN_DIR: no complete checkpoint-N/ or final/ (nothing to evaluate)"

if [[ -z $PROMPT ]]; then
  PROMPT=$("$PYTHON" - "$RUN_DIR" <<'EOF'
import json, re, sys
from pathlib import Path
run = Path(sys.argv[1])
mode = None
try:
    mode = json.loads((run / "run.json").read_text())["config"]["prompt_mode"]
except (OSError, ValueError, KeyError, TypeError):
    for card in sorted(run.glob("*/README.md")):
        match = re.search(r'"prompt_mode": "(\w+)"', card.read_text())
        if match:
            mode = match.group(1)
            break
print(mode if mode in ("direct", "answer", "think") else "answer")
EOF
)
fi
if [[ $PROMPT == think ]]; then MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}; else MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}; fi
mkdir -p "$OUT"
echo "evaluating ${#CHECKPOINTS[@]} checkpoints of $RUN_DIR on $DATA ($PROMPT prompt) -> $OUT"

for entry in "${CHECKPOINTS[@]}"; do
  step=${entry%%$'\t'*}
  ckpt=${entry#*$'\t'}
  pred=$OUT/step-$step.json
  if [[ -f $OUT/step-$step.scored.json ]]; then
    echo "step $step: already evaluated"
    continue
  fi
  if [[ -f $pred ]]; then  # predicted, not yet scored
    "${CLI[@]}" score "$pred" --output "$OUT/step-$step.scored.json" | grep "Total Accuracy" || true
    continue
  fi
  args=()
  if [[ -f $ckpt/adapter_config.json ]]; then
    base=$MODEL
    if [[ -z $base ]]; then
      base=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("base_model_name_or_path") or "")' \
             "$ckpt/adapter_config.json")
      [[ -n $base ]] || die "$ckpt/adapter_config.json names no base_model_name_or_path; pass MODEL"
    fi
    args=(--model "$base" --adapter "$ckpt")
  else
    args=(--model "$ckpt")
  fi
  [[ -n ${LIMIT:-} ]] && args+=(--limit "$LIMIT")
  echo "step $step: $ckpt"
  "${CLI[@]}" infer "${args[@]}" --data "$DATA" --prompt "$PROMPT" --out "$pred" --batch-size "$BATCH_SIZE" \
    --max-new-tokens "$MAX_NEW_TOKENS" --device "$DEVICE" --dtype "$DTYPE" >/dev/null
  "${CLI[@]}" score "$pred" --output "$OUT/step-$step.scored.json" | grep "Total Accuracy" || true
done

"$PYTHON" - "$OUT" "$RUN_DIR" "$PROMPT" <<'EOF'
import csv, json, re, sys
from pathlib import Path
from audio_rft.eval.report import bootstrap_ci, plot_accuracy_vs_step
from audio_rft.eval.score import TASK_ORDER
from audio_rft.fileio import atomic_write_text

out, run, prompt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = []
for scored in out.glob("step-*.scored.json"):
    step = int(re.fullmatch(r"step-(\d+)\.scored\.json", scored.name).group(1))
    summary = json.loads(scored.read_text())["summary"]
    ci = bootstrap_ci(summary["correct"], summary["n"]) or [None, None]
    row = {"step": step, "average": summary["total_accuracy"], "ci_low": ci[0], "ci_high": ci[1], "n": summary["n"]}
    for task in TASK_ORDER:
        row[task] = summary["task"].get(task, {}).get("accuracy")
    rows.append(row)
rows.sort(key=lambda r: r["step"])
columns = ["step", *TASK_ORDER, "average", "ci_low", "ci_high", "n"]
with open(out / "accuracy_by_step.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
cell = lambda x: "—" if x is None else str(x)
md = [f"# Accuracy by checkpoint: {run} ({prompt} prompt)", "",
      "Accuracy in percent (MMAU rule); 95% bootstrap interval of the average.", "",
      "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
atomic_write_text(out / "accuracy_by_step.md", "\n".join(md) + "\n")
plot_accuracy_vs_step(rows, out / "accuracy_by_step.png", title=f"{run}: accuracy by checkpoint ({prompt} prompt)")
print("\n".join(md[4:]))
print(f"wrote {out}/accuracy_by_step.csv, .md and .png")
EOF
