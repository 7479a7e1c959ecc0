"""numba's TBB threading layer where the `tbb` package is installed: kernels launched from any thread.

numba's parallel kernels run on a threading layer picked at the first launch: TBB if it loads,
else OpenMP, else its own workqueue. pip's `tbb` puts libtbb.so.12 in the environment's lib/
folder, which the dynamic loader does not search, so numba silently fell back to GNU OpenMP. That
layer is fast from the main thread only: launched from any other thread (the batch engine's
stepping thread, which serves `spark-lab serve` and BatchEngine, a notebook's worker threads,
the diffusion kernels' helper threads) each launch cost ~100 us more (SmolLM2's 576 x 1536 Q8_0
mat-vec: 16 us on the main thread, 117 us on another; TBB: 15 us on either), ~150 launches a
token: one stream through the server decoded at 90 tok/s where the main thread makes 160.

`preload()` loads libtbb globally before numba's first launch, so numba's default order (TBB
first) finds it; without the package, or with NUMBA_THREADING_LAYER set, nothing changes.
"""
from __future__ import annotations

import os
import sys

LIBS = ("libtbb.so.12", "libtbb.12.dylib")   # Linux, macOS (pip's wheels put it in <prefix>/lib)
_PRELOADED: str | None = None                 # what preload() loaded


def preload() -> str | None:
    """Load libtbb from this environment so numba picks its TBB layer -> the path, or None."""
    if os.environ.get("NUMBA_THREADING_LAYER") or "numba.np.ufunc.tbbpool" in sys.modules:
        return None                              # the user's choice, or numba has chosen already
    import ctypes
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for name in LIBS:
            path = os.path.join(prefix, "lib", name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    return None
                global _PRELOADED
                _PRELOADED = path
                return path
    return None


def concurrent_launches() -> bool:
    """True when numba's parallel kernels may be launched from two threads at once: TBB was
    preloaded, or the user picked a layer that allows it (numba's own workqueue aborts the process)."""
    chosen = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    return chosen in ("tbb", "omp", "safe", "threadsafe") if chosen else _PRELOADED is not None
