#!/usr/bin/env bash
# The checks that need a GPU, for the day one is at hand (not run on the CPU machines this project is built on).
# On one 80 GB+ CUDA GPU, no download, within about 8 minutes:
#   - Qwen2-Audio-7B-Instruct's architecture with random weights, one LoRA GRPO step of our code at R1-AQA's
#     shapes (G = 8, 833-token prompt, 32- and 256-token completions): torch.cuda.max_memory_allocated beside
#     the traced prediction (`audio-rft plan --trace`'s step, fake tensors) for the same step;
#   - one batched decode (16 prompts x 32 tokens), timed;
#   - the tests marked `gpu` (pytest -m gpu);
# and writes docs/bench/gpu-<date>.json. Usage: bash scripts/gpu_check.sh [OUT.json]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
out=${1:-$here/docs/bench/gpu-$(date -u +%Y-%m-%d).json}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "gpu_check.sh: no CUDA GPU visible; nothing to check" >&2; exit 2; }
cd "$here"
timeout 480 env PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" scripts/gpu_check.py --out "$out"
"$PYTHON" -m pytest -m gpu -q tests || status=$?
# exit status 5: no test is marked gpu yet
[[ ${status:-0} -eq 0 || ${status:-0} -eq 5 ]]
echo "gpu_check.sh: wrote $out"
