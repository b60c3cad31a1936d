#!/usr/bin/env bash
# AVQA training set -> runs/data/avqa. Download AVQA yourself, then
# extract each video's audio, e.g.:
#   for f in "$AVQA/videos"/*.mp4; do ffmpeg -v error -i "$f" -vn -ac 1 -ar 16000 "$AVQA/audios/$(basename "${f%.*}").wav"; done
set -euo pipefail
AVQA=${AVQA:-data/AVQA}
OUT=${OUT:-runs/data/avqa}
audio-rft prepare avqa "$AVQA/train_qa.json" --audio-dir "$AVQA/audios" --audio-pattern '{video_name}.wav' --out "$OUT"
# R1-AQA's JSONL instead (absolute audio_path in every line):
#   audio-rft prepare avqa avqa-train.jsonl --out "$OUT"
audio-rft validate "$OUT"
