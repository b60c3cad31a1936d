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
#   GPUS          GPUs to run on (default: every visible GPU; 1 when none is visible). Each training stage keeps
#                 its own `launch:` strategy (r1-aqa.yaml: LoRA stages on DDP, full fine-tuning on FSDP2) with
#                 its process count set to GPUS; with GPUS=1 every stage runs in-process, and the stages that
#                 do not fit one GPU are left out, with what reads from them (`audio-rft plan` decides and says
#                 why). The pipeline actually run is written to OUT/pipeline-GPUSgpu.yaml.
#   GPU_GB        memory per GPU in GiB, for that decision (default 80)
#   TRACE         1: decide from a traced step of each stage (`audio-rft plan --trace`, minutes on a CPU)
#                 instead of the formula's estimate
#   PIPELINE      pipeline file (default pipelines/r1-aqa.yaml)
#   AUDIO_RFT     the command (default audio-rft)
# Arguments are passed on to `audio-rft run` (overrides such as grpo.max_steps=500, --force, --dry-run).
#
# `--dry-run` prints the launch each stage gets on GPUS GPUs (and which are left out), then runs nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "reproduce_r1_aqa.sh: $*" >&2; exit 2; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi

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
  if [[ $GPUS -eq 0 ]]; then
    echo "reproduce_r1_aqa.sh: warning: no GPU visible (nvidia-smi); planning for one GPU (the 7B will be very slow)" >&2
    GPUS=1
  fi
fi
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "GPUS=$GPUS: give a number of GPUs (1 or more)"

# `audio-rft plan` reads each training stage's launch line, sets its process count to GPUS (one GPU: in-process),
# estimates each stage's memory per GPU, and writes the pipeline without the stages that do not fit.
plan_overrides=("${overrides[@]}")
for arg in "$@"; do [[ $arg == *=* && $arg != -* ]] && plan_overrides+=("$arg"); done
mkdir -p "$OUT"
fitted=$OUT/pipeline-${GPUS}gpu.yaml
plan_flags=(--gpus "$GPUS" --gpu-gb "${GPU_GB:-80}" --summary --write-pipeline "$fitted")
[[ ${TRACE:-0} == 1 ]] && plan_flags+=(--trace)
"${CLI[@]}" plan --config "$PIPELINE" "${plan_flags[@]}" "${plan_overrides[@]}"

set -x
exec "${CLI[@]}" run "$fitted" --out "$OUT" "${overrides[@]}" "$@"
