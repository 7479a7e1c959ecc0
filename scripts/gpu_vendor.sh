#!/usr/bin/env bash
# Copy the pure-Python packages the GPU check needs from this venv into out/gpu_vendor (about 4 MB),
# for a GPU machine whose Python has numpy/cupy/torch/numba but cannot reach a package index:
# carry out/gpu_vendor with the working tree; scripts/gpu_check.sh puts on the path only the ones
# that machine's Python lacks. Compiled extensions are left out (their pure fallbacks are used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=out/gpu_vendor
rm -rf "$DEST" && mkdir -p "$DEST"
SITE=$("$PY" -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
for name in gguf yaml tqdm threadpoolctl.py jinja2 markupsafe pysbd; do
  if [ -e "$SITE/$name" ]; then
    cp -r "$SITE/$name" "$DEST/"
  fi
done
find "$DEST" \( -name "*.so" -o -name "__pycache__" \) -prune -exec rm -rf {} +
du -sh "$DEST"
