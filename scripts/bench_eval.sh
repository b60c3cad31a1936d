#!/usr/bin/env bash
# Inference items/s, audio-rft's run_inference vs R1-AQA's test script, on the bench preset;
# writes docs/bench/eval.json. See docs/performance.md.
# Extra arguments go to `audio-rft bench eval` (e.g. --items 64 --batch-size 32).
set -euo pipefail
cd "$(dirname "$0")/.."
exec audio-rft bench eval --json "${OUT:-docs/bench/eval.json}" --threads "${THREADS:-2}" "$@"
