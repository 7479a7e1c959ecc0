#!/usr/bin/env bash
# The GPU check, for any machine with an NVIDIA GPU and CuPy (cupy-cuda13x or cupy-cuda12x):
#   1. every test marked gpu (each CUDA kernel against its NumPy twin, the models' CuPy paths),
#   2. the models end to end on CuPy against the same run on the CPU (SmolLM2-shaped LLM: greedy
#      tokens equal; spark-emoji: image max |diff|),
#   3. speed against torch CUDA: LLM prefill/decode vs transformers (float32 and bfloat16, the same
#      dequantized weights), the image loop vs diffusers,
# all in one JSON report: $OUT/gpu_report.json when OUT is set, else out/gpu_report.json. Each part
# runs under its own timeout and the report is rewritten after each, so a failure costs one part.
# Nothing is downloaded or installed: the script reports which packages are missing (the parts
# that need them fail alone). Budget: GPU_CHECK_BUDGET seconds in all (default 450, under 8 min).
# Usage: bash scripts/gpu_check.sh          PY=/path/to/python to choose the interpreter;
#        SPARK_LAB_VENDOR=dir (default out/gpu_vendor, made by scripts/gpu_vendor.sh): pure-Python
#        packages (gguf, yaml, tqdm, ...) put on the path where this Python lacks them.
#        bash scripts/gpu_check.sh --device strict     a dry run on the CPU stand-in (no GPU needed)
#        bash scripts/gpu_check.sh --skip pytest_gpu  on a short budget (--only a,b for chosen parts)
set -uo pipefail
cd "$(dirname "$0")/.."

# the interpreter: PY, else the first of .venv/bin/python and python3 that can import CuPy
if [ -z "${PY:-}" ]; then
  for cand in .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import cupy" >/dev/null 2>&1; then PY=$cand; break; fi
  done
  PY=${PY:-python3}
fi
# pure-Python packages this Python lacks, from a vendor folder (scripts/gpu_vendor.sh makes out/gpu_vendor)
VENDOR=${SPARK_LAB_VENDOR:-out/gpu_vendor}
EXTRA=""
if [ -d "$VENDOR" ]; then
  PICK=$(mktemp -d)
  for p in "$VENDOR"/*; do
    mod=$(basename "$p" .py)
    if ! "$PY" -c "import $mod" >/dev/null 2>&1; then ln -s "$(cd "$(dirname "$p")" && pwd)/$(basename "$p")" "$PICK/"; echo "gpu_check: using vendored $mod"; fi
  done
  EXTRA=":$PICK"
fi
export PYTHONPATH="$PWD$EXTRA${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
REPORT="${OUT:-out}/gpu_report.json"
mkdir -p "$(dirname "$REPORT")"
echo "gpu_check: $("$PY" --version 2>&1) at $(command -v "$PY"); report -> $REPORT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

timeout --kill-after=10 "$(( ${GPU_CHECK_BUDGET:-450} + 30 ))" "$PY" scripts/gpu_check.py --report "$REPORT" "$@"
rc=$?
if [ ! -s "$REPORT" ]; then   # the driver itself could not start (no numpy, a broken interpreter)
  printf '{"status": "gpu_check.py did not run", "returncode": %d, "python": "%s"}\n' "$rc" "$PY" > "$REPORT"
fi
exit $rc
