#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU and CuPy (cupy-cuda13x or cupy-cuda12x):
#   1. every test marked gpu (each CuPy/CUDA kernel against its NumPy twin),
#   2. the kernel roofline benchmark on the GPU (quick sizes; FULL=1 for the full sizes).
# Installs nothing heavy: only the kit's light pure-Python dependencies, and only if missing.
# Takes a few minutes. Usage: bash scripts/gpu_check.sh   (PY=/path/to/python to choose one)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

"$PY" - <<'PYEOF'
import sys
try:
    import cupy
except Exception as e:
    sys.exit(f"gpu_check: CuPy is not importable ({type(e).__name__}: {e}); pip install cupy-cuda13x (or cupy-cuda12x)")
if not cupy.cuda.is_available():
    sys.exit("gpu_check: CuPy is installed but sees no CUDA device")
props = cupy.cuda.runtime.getDeviceProperties(0)
name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
print(f"gpu_check: {name}, compute {props['major']}.{props['minor']}, CuPy {cupy.__version__}, "
      f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")
PYEOF

# light dependencies the GPU tests import (no torch, no model weights)
if ! "$PY" -c "import numpy, gguf, threadpoolctl, plotly, pytest, psutil" 2>/dev/null; then
  "$PY" -m pip install -q numpy gguf threadpoolctl plotly pytest psutil
fi

export SPARK_LAB_DEVICE=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== pytest -m gpu"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests

echo "== spark-lab bench kernels (GPU)"
if [ "${FULL:-0}" = "1" ]; then
  "$PY" -m spark_lab.cli bench kernels
else
  "$PY" -m spark_lab.cli bench kernels --quick
fi
