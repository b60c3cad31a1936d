#!/usr/bin/env bash
# One GRPO step, audio-rft's vs R1-AQA's way, on the bench preset (Qwen2-Audio-7B's shapes, 84M parameters),
# interleaved in fresh processes; writes docs/bench/grpo.json. See docs/performance.md.
# Extra arguments go to `audio-rft bench grpo` (e.g. --steps 3 --think-steps 1 --threads 2).
set -euo pipefail
cd "$(dirname "$0")/.."
exec audio-rft bench grpo --json "${OUT:-docs/bench/grpo.json}" --threads "${THREADS:-2}" "$@"
