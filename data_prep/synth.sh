#!/usr/bin/env bash
# The synthetic bench (runs/data/synth/{train,test}); nothing to download.
set -euo pipefail
OUT=${OUT:-runs/data/synth}
audio-rft prepare synth --out "$OUT" --train "${TRAIN:-2000}" --test "${TEST:-500}" --seed "${SEED:-0}"
audio-rft validate "$OUT/train"
audio-rft validate "$OUT/test"
