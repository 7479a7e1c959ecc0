"""spark_lab.numba_cache: cached kernels load without numba's registry refresh, with the same results."""
import json
import subprocess
import sys
import types

import pytest

from spark_lab import numba_cache

numba = pytest.importorskip("numba")

# a fresh process: load spark_lab's GroupNorm kernel from numba's cache (compiling it first if the
# cache is cold), count numba's registry refreshes during a second, cold load, print its result
_CHILD = r"""
import json, os, sys
import numpy as np
import numba.core.base as base
calls = []
orig = base.BaseContext.refresh
def refresh(self):
    calls.append(1)
    return orig(self)
base.BaseContext.refresh = refresh
import spark_lab
from spark_lab.kernels import norms
x = np.sin(np.arange(8 * 1024, dtype=np.float32)).reshape(1, 8, 1024)
w = np.linspace(0.5, 1.5, 8, dtype=np.float32)
y = norms.group_norm(x, 4, w, w[::-1].copy(), 1e-6, silu=True)  # the numba kernel (above GROUP_NORM_FUSED_MIN)
import numba.core.caching as caching
print(json.dumps({"refreshes": len(calls), "patched": getattr(caching.Cache.load_overload, "_spark_lab", False),
                  "y": np.asarray(y, np.float64).ravel().tolist()}))
"""


def _child(env_extra):
    import os
    env = dict(os.environ, **env_extra)
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cached_kernel_loads_without_refresh_and_gives_numbas_result():
    _child({})                                            # compiles into the cache if it was cold
    fast = _child({})
    slow = _child({"SPARK_LAB_NUMBA_REFRESH": "1"})
    assert fast["patched"] and not slow["patched"]
    assert slow["refreshes"] >= 1                         # numba's own load refreshes the registries
    assert fast["refreshes"] == 0                         # loaded from the cache: nothing refreshed
    assert fast["y"] == slow["y"]                         # bit for bit: the same compiled code ran


def test_patch_leaves_an_unknown_numba_alone():
    mod = types.SimpleNamespace(Cache=type("Cache", (), {"load_overload": lambda self, s, t: None}))
    assert numba_cache.patch(mod) is False                # no _load_overload: a numba it does not know
    assert not getattr(mod.Cache.load_overload, "_spark_lab", False)


def test_only_spark_lab_sources_take_the_short_path():
    def here():
        pass
    ours = types.SimpleNamespace(_py_func=numba_cache.patch)
    theirs = types.SimpleNamespace(_py_func=json.dumps)
    assert numba_cache._ours(ours) and not numba_cache._ours(theirs)
    assert numba_cache._ours(types.SimpleNamespace(_py_func=here)) is False   # tests/ is not the package
