#!/usr/bin/env bash
# The main job on a fresh machine: set up (once) and run the embedded demo pipeline on the CPU.
#   bash scripts/demo.sh [--out DIR] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/audio-rft ]]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0        # the CPU build first: no multi-GB CUDA download
  .venv/bin/python -m pip install -q -e '.[dev]'
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/audio-rft run pipelines/demo.yaml "$@"
