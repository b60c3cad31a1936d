#!/usr/bin/env bash
# MMAU test-mini -> runs/data/mmau-test-mini. Get the data first (as R1-AQA's README describes):
#   git clone https://github.com/Sakshi113/MMAU.git data/MMAU
#   download test-mini-audios.tar.gz (link in the MMAU README) into data/MMAU, then: tar -xzf test-mini-audios.tar.gz
set -euo pipefail
MMAU=${MMAU:-data/MMAU}
OUT=${OUT:-runs/data/mmau-test-mini}
audio-rft prepare mmau "$MMAU/mmau-test-mini.json" --audio-dir "$MMAU" --out "$OUT"
audio-rft validate "$OUT"
