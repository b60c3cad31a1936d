#!/usr/bin/env bash
# Evaluate every checkpoint of a training run: accuracy against step, and the checkpoint chosen on a dev split.
#
#   [DEV=DEV_DATA] scripts/eval_checkpoints.sh RUN_DIR DATA [MODEL] [PROMPT]
#
#   RUN_DIR  an `audio-rft sft|grpo` output folder (a pipeline's DIR/<stage>) holding checkpoint-N/ and final/
#   DATA     a prepared benchmark folder, the test split (e.g. runs/r1-aqa/mmau, or runs/demo/data/test)
#   MODEL    base model for LoRA checkpoints (default: each adapter's adapter_config.json
#            base_model_name_or_path); full-weight checkpoints are loaded as they are
#   PROMPT   direct | answer | think (default: the run's prompt_mode from RUN_DIR/run.json or
#            the checkpoint's model card, else answer)
#
# Environment: DEV (a prepared dev split, e.g. from `audio-rft prepare ... dev=N`: the checkpoint is chosen
# there), OUT (default RUN_DIR/eval-by-step), BATCH_SIZE (16), MAX_NEW_TOKENS (32; 512 for think), LIMIT (only
# the first N items), DEVICE (auto), DTYPE (auto), AUDIO_RFT (the command, default audio-rft).
#
# For each checkpoint: `audio-rft infer` -> OUT/step-N.json, `audio-rft score --output` -> OUT/step-N.scored.json,
# and the same on DEV under OUT/dev/. Then OUT/accuracy_by_step.csv and .md (accuracy per task and on average,
# with a 95% bootstrap interval, and on DEV) and OUT/accuracy_by_step.png, and OUT/selection.json: the test
# score of the checkpoint chosen on DEV (the number to report), beside the best-on-test and the mean over
# checkpoints, labelled. OUT/chosen.json and OUT/best-on-test.json are those checkpoints' test predictions,
# with how each was chosen in their meta, so `audio-rft report` flags the one chosen on the split it is scored
# on. Without DEV only the best-on-test exists, and it is flagged. Rerunning skips checkpoints already
# evaluated (and resumes a cut-off one), so it can follow a run in progress. Training keeps only the newest
# keep_checkpoints (default 3): set keep_checkpoints=0 to keep them all.
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
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
DEV=${DEV:-}
DEV=${DEV%/}
[[ -z $DEV || -f $DEV/data.jsonl ]] || die "DEV=$DEV: not a prepared dataset (no data.jsonl)"

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
echo "evaluating ${#CHECKPOINTS[@]} checkpoints of $RUN_DIR on $DATA${DEV:+ and on the dev split $DEV} ($PROMPT prompt) -> $OUT"

# evaluate STEP CHECKPOINT DATA PREFIX: PREFIX.json and PREFIX.scored.json
evaluate() {
  local step=$1 ckpt=$2 data=$3 prefix=$4
  if [[ -f $prefix.scored.json ]]; then
    echo "step $step on $data: already evaluated"
    return
  fi
  if [[ ! -f $prefix.json ]]; then  # not yet predicted (a predicted, unscored one is only scored)
    local args=()
    if [[ -f $ckpt/adapter_config.json ]]; then
      local base=$MODEL
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
    echo "step $step on $data: $ckpt"
    "${CLI[@]}" infer "${args[@]}" --data "$data" --prompt "$PROMPT" --out "$prefix.json" --batch-size "$BATCH_SIZE" \
      --max-new-tokens "$MAX_NEW_TOKENS" --device "$DEVICE" --dtype "$DTYPE" >/dev/null
  fi
  "${CLI[@]}" score "$prefix.json" --output "$prefix.scored.json" | grep "Total Accuracy" || true
}

if [[ -n $DEV ]]; then mkdir -p "$OUT/dev"; fi
for entry in "${CHECKPOINTS[@]}"; do
  step=${entry%%$'\t'*}
  ckpt=${entry#*$'\t'}
  if [[ -n $DEV ]]; then evaluate "$step" "$ckpt" "$DEV" "$OUT/dev/step-$step"; fi
  evaluate "$step" "$ckpt" "$DATA" "$OUT/step-$step"
done

"$PYTHON" - "$OUT" "$RUN_DIR" "$PROMPT" "$DATA" "$DEV" <<'EOF'
import csv, json, re, shutil, sys
from pathlib import Path
from audio_rft.data.dataset import benchmark_version
from audio_rft.eval.report import bootstrap_ci, plot_accuracy_vs_step
from audio_rft.eval.score import TASK_ORDER
from audio_rft.fileio import atomic_write_json, atomic_write_text

out, run, prompt, data, dev = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] or None


def scored(folder: Path) -> dict:
    found = {}
    for path in folder.glob("step-*.scored.json"):
        found[int(re.fullmatch(r"step-(\d+)\.scored\.json", path.name).group(1))] = json.loads(path.read_text())["summary"]
    return found


test, on_dev = scored(out), scored(out / "dev") if dev else {}
rows = []
for step, summary in sorted(test.items()):
    ci = bootstrap_ci(summary["correct"], summary["n"]) or [None, None]
    row = {"step": step, "average": summary["total_accuracy"], "ci_low": ci[0], "ci_high": ci[1], "n": summary["n"]}
    for task in TASK_ORDER:
        row[task] = summary["task"].get(task, {}).get("accuracy")
    row["dev"] = on_dev[step]["total_accuracy"] if step in on_dev else None
    rows.append(row)
columns = ["step", *TASK_ORDER, "average", "ci_low", "ci_high", "n"] + (["dev"] if dev else [])
with open(out / "accuracy_by_step.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
cell = lambda x: "—" if x is None else str(x)
md = [f"# Accuracy by checkpoint: {run} ({prompt} prompt)", "",
      "Accuracy in percent (MMAU rule) on the test split; 95% bootstrap interval of the average"
      + ("; `dev`: the average on the dev split, where the checkpoint is chosen." if dev else "."), "",
      "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]

scorable = [r for r in rows if r["average"] is not None]
selection = {"test_data": data, "dev_data": dev, "checkpoints": len(scorable), "chosen_on_dev": None}
if scorable:
    best = max(scorable, key=lambda r: (r["average"], -r["step"]))  # ties: the earliest step
    selection["best_on_test"] = {"step": best["step"], "test_accuracy": best["average"],
                                 "note": "chosen on the split it is scored on: optimistic, not an estimate for new data"}
    selection["mean_over_checkpoints"] = round(sum(r["average"] for r in scorable) / len(scorable), 2)
    on_dev_rows = [r for r in scorable if r["dev"] is not None]
    if dev and on_dev_rows:
        chosen = max(on_dev_rows, key=lambda r: (r["dev"], -r["step"]))
        selection["chosen_on_dev"] = {"step": chosen["step"], "dev_accuracy": chosen["dev"],
                                      "test_accuracy": chosen["average"], "test_ci95": [chosen["ci_low"], chosen["ci_high"]]}
    # each chosen checkpoint's test predictions, with how it was chosen, for `audio-rft report`
    for name, row, chosen_on in (("best-on-test", best, data), ("chosen", selection["chosen_on_dev"], dev)):
        if row is None or chosen_on is None:
            continue
        source = out / f"step-{row['step']}.json"
        shutil.copyfile(source, out / f"{name}.json")
        meta_path = source.with_name(source.stem + ".meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        atomic_write_json(out / f"{name}.meta.json", {**meta, "chosen_step": row["step"],
                                                      "chosen_on": {"data": chosen_on, "version": benchmark_version(chosen_on)}})
    md += ["", "## Which checkpoint", ""]
    if selection["chosen_on_dev"]:
        c = selection["chosen_on_dev"]
        md.append(f"- **Chosen on the dev split** ({dev}): step {c['step']} (dev {c['dev_accuracy']}%), test "
                  f"**{c['test_accuracy']}%** [{c['test_ci95'][0]}, {c['test_ci95'][1]}]: the number to report "
                  f"(its predictions: chosen.json).")
    else:
        md.append("- No dev split given (DEV=): no checkpoint can be chosen without looking at the test split.")
    md.append(f"- Best on the test split (chosen on the split it is scored on: optimistic, not an estimate): step "
              f"{best['step']}, {best['average']}% (best-on-test.json).")
    md.append(f"- Mean over the {len(scorable)} checkpoints: {selection['mean_over_checkpoints']}%.")
atomic_write_json(out / "selection.json", selection)
atomic_write_text(out / "accuracy_by_step.md", "\n".join(md) + "\n")
plot_accuracy_vs_step(rows, out / "accuracy_by_step.png", title=f"{run}: accuracy by checkpoint ({prompt} prompt)")
print("\n".join(md[4:]))
print(f"wrote {out}/accuracy_by_step.csv, .md and .png, and selection.json")
EOF
