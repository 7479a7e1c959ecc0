#!/usr/bin/env bash
# Print the CuPy extra that fits this machine's NVIDIA GPU: cuda13, cuda12, or nothing (CPU only).
# `make setup` installs ".[lab,<extra>]"; --why adds the reason. The logic lives in
# spark_lab/cuda_setup.py (standard library only, runs before the venv exists).
# Usage: bash scripts/detect_gpu.sh [--why]      SPARK_LAB_CUDA=cuda13|cuda12|none overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" spark_lab/cuda_setup.py "$@"
