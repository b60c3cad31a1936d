#!/usr/bin/env bash
# Reproduce R1-AQA (Li et al. 2025, arXiv 2503.11197) with audio-rft: `audio-rft run pipelines/r1-aqa.yaml`
# with your data paths filled in. Needs a GPU, Qwen2-Audio-7B-Instruct, AVQA and MMAU test-mini
# (pipelines/README.md says where to get each). Rerun the same command to resume after a crash.
#
#   AVQA_JSON=/data/AVQA/train_qa.json AVQA_AUDIO=/data/AVQA/audios \
#   MMAU_JSON=/data/MMAU/mmau-test-mini.json MMAU_AUDIO=/data/MMAU \
#   scripts/reproduce_r1_aqa.sh [STAGE.KEY=VALUE ...] [--force STAGE] [--dry-run]
#
# Environment:
#   AVQA_JSON     AVQA's train_qa.json, or R1-AQA's JSONL (objects with `audio_path`)       (required)
#   AVQA_AUDIO    folder of AVQA's audio as {video_name}.wav; leave unset for R1-AQA's JSONL
#   MMAU_JSON     mmau-test-mini.json                                                       (required)
#   MMAU_AUDIO    the folder holding test-mini-audios/ (default: MMAU_JSON's folder)
#   PAPER_TABLE   CSV of the paper's Table 1 to show beside ours (default: none)
#   OUT           run folder (default runs/r1-aqa)
#   GPUS          processes per training stage (default: every visible GPU); more than 1 runs the sft/grpo
#                 stages with `accelerate launch --config_file pipelines/accelerate/ddp.yaml --num_processes GPUS`
#   PIPELINE      pipeline file (default pipelines/r1-aqa.yaml)
#   AUDIO_RFT     the command (default audio-rft)
# Arguments are passed on to `audio-rft run` (overrides such as grpo.max_steps=500, --force, --dry-run).
#
# Before the first run, size the GPU memory: audio-rft plan --config pipelines/r1-aqa.yaml [--gpu-gb 141]
# (full fine-tuning, the sft-full stage, does not fit on an 80 GB GPU: delete it and its eval variant).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "reproduce_r1_aqa.sh: $*" >&2; exit 2; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi

PIPELINE=${PIPELINE:-$here/pipelines/r1-aqa.yaml}
OUT=${OUT:-runs/r1-aqa}
read -r -a CLI <<< "${AUDIO_RFT:-audio-rft}"
[[ -n ${AVQA_JSON:-} ]] || die "set AVQA_JSON to AVQA's train_qa.json (or R1-AQA's JSONL); see --help"
[[ -n ${MMAU_JSON:-} ]] || die "set MMAU_JSON to mmau-test-mini.json; see --help"
[[ -f $AVQA_JSON ]] || die "AVQA_JSON=$AVQA_JSON: no such file"
[[ -f $MMAU_JSON ]] || die "MMAU_JSON=$MMAU_JSON: no such file"
MMAU_AUDIO=${MMAU_AUDIO:-$(dirname "$MMAU_JSON")}
[[ -d $MMAU_AUDIO ]] || die "MMAU_AUDIO=$MMAU_AUDIO: no such folder"
if [[ -n ${AVQA_AUDIO:-} ]]; then
  [[ -d $AVQA_AUDIO ]] || die "AVQA_AUDIO=$AVQA_AUDIO: no such folder"
  avqa_audio=$AVQA_AUDIO
else
  avqa_audio=null  # R1-AQA's JSONL: each item's audio_path is used as given
fi
if [[ -n ${PAPER_TABLE:-} ]]; then
  [[ -f $PAPER_TABLE ]] || die "PAPER_TABLE=$PAPER_TABLE: no such file"
  paper_table=$PAPER_TABLE
else
  paper_table=null
fi

overrides=(
  "avqa.input=$AVQA_JSON" "avqa.audio_dir=$avqa_audio"
  "mmau.input=$MMAU_JSON" "mmau.audio_dir=$MMAU_AUDIO"
  "report.paper_table=$paper_table"
)

if [[ -z ${GPUS:-} ]]; then
  GPUS=0
  if command -v nvidia-smi >/dev/null; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
fi
if [[ $GPUS -gt 1 ]]; then
  launch="accelerate launch --config_file $here/pipelines/accelerate/ddp.yaml --num_processes $GPUS"
  # every sft/grpo stage the pipeline has (one may have been deleted to fit the GPU)
  mapfile -t training < <(python -c '
import sys, yaml
for stage in yaml.safe_load(open(sys.argv[1]))["stages"]:
    if stage.get("kind") in ("sft", "grpo"):
        print(stage["name"])' "$PIPELINE")
  for stage in "${training[@]}"; do
    overrides+=("$stage.launch=$launch")
  done
  echo "training stages (${training[*]}): $GPUS processes each ($launch)"
elif [[ $GPUS -eq 0 ]]; then
  echo "reproduce_r1_aqa.sh: warning: no GPU visible (nvidia-smi); the 7B will be very slow or will not fit" >&2
fi

set -x
exec "${CLI[@]}" run "$PIPELINE" --out "$OUT" "${overrides[@]}" "$@"
