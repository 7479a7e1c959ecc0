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


def test_source_stamp_follows_the_package_modules_a_kernel_imports(tmp_path):
    """A cached kernel is keyed on its file and the same-package modules it imports: editing only
    an imported module (where the LLVM-IR intrinsics live) changes the stamp, so numba recompiles."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "kern.py").write_text("from .simd import LANES\n\ndef f():\n    from . import blocks, missing\n    return LANES\n")
    (pkg / "simd.py").write_text("LANES = 16\n")
    (pkg / "blocks.py").write_text("from .simd import LANES\n")
    (pkg / "other.py").write_text("X = 1\n")
    assert [p.name for p in numba_cache.local_imports(pkg / "kern.py")] == ["simd.py", "blocks.py"]
    s0 = numba_cache.source_stamp(pkg / "kern.py")
    assert numba_cache.source_stamp(pkg / "kern.py") == s0
    (pkg / "other.py").write_text("X = 2\n")                    # not imported: same stamp
    assert numba_cache.source_stamp(pkg / "kern.py") == s0
    (pkg / "blocks.py").write_text("from .simd import LANES  # edited\n")
    s1 = numba_cache.source_stamp(pkg / "kern.py")
    assert s1 != s0
    (pkg / "simd.py").write_text("LANES = 8\n")
    s2 = numba_cache.source_stamp(pkg / "kern.py")
    assert s2 not in (s0, s1)
    (pkg / "sub").mkdir()                                       # a subpackage's module: `from .sub.deep import`
    (pkg / "sub" / "deep.py").write_text("W = 1\n")
    (pkg / "blocks.py").write_text("from .simd import LANES  # edited\nfrom .sub.deep import W\n")
    assert [p.name for p in numba_cache.local_imports(pkg / "blocks.py")] == ["simd.py", "deep.py"]
    s3 = numba_cache.source_stamp(pkg / "kern.py")
    (pkg / "sub" / "deep.py").write_text("W = 22\n")
    s4 = numba_cache.source_stamp(pkg / "kern.py")
    assert s4 not in (s0, s1, s2, s3)
    (pkg / "sub" / "up.py").write_text("from ..other import X\nfrom .. import simd\n")   # a parent package's modules
    assert [p.name for p in numba_cache.local_imports(pkg / "sub" / "up.py")] == ["other.py", "simd.py"]
    (pkg / "sub" / "deep.py").write_text("from ..other import X\n")
    s5 = numba_cache.source_stamp(pkg / "kern.py")
    (pkg / "other.py").write_text("X = 3\n")
    assert numba_cache.source_stamp(pkg / "kern.py") not in (s4, s5)


def test_source_stamp_holds_the_int8_code_override(tmp_path, monkeypatch):
    """SPARK_LAB_VNNI=0 compiles the portable int8 code: a cache entry made with it is not one for a
    run without it (numba's own key holds the CPU's features, which the override does not change)."""
    (tmp_path / "kern.py").write_text("X = 1\n")
    monkeypatch.delenv("SPARK_LAB_VNNI", raising=False)
    s0 = numba_cache.source_stamp(tmp_path / "kern.py")
    monkeypatch.setenv("SPARK_LAB_VNNI", "0")
    assert numba_cache.source_stamp(tmp_path / "kern.py") != s0
    monkeypatch.setenv("SPARK_LAB_VNNI", "1")
    assert numba_cache.source_stamp(tmp_path / "kern.py") == s0


def test_spark_lab_kernels_are_keyed_on_their_intrinsics():
    """qmatvec's kernels.py stamp covers simd.py and q8.py; decode attention's covers kv_rows and attn_blocks."""
    from pathlib import Path
    import spark_lab
    root = Path(spark_lab.__file__).parent / "kernels"
    assert {p.name for p in numba_cache.local_imports(root / "qmatvec" / "kernels.py")} >= {"simd.py", "q8.py"}
    assert {p.name for p in numba_cache.local_imports(root / "decode_attention.py")} >= {"kv_rows.py", "attn_blocks.py"}
    assert root / "qmatvec" / "simd.py" in numba_cache.local_imports(root / "attn_blocks.py")   # its dot4 (q8_0 key tiles)
    assert root / "expf.py" in numba_cache.local_imports(root.parent / "llm" / "decode.py")   # SwiGLU's exp
    import numba.core.caching as caching
    from spark_lab.kernels import qmatvec as qm
    if qm._jit() is None:
        pytest.skip("numba kernels unavailable")
    cache = caching.FunctionCache(qm.kernels.SOURCES["nib"])
    assert cache._cache_file._source_stamp == numba_cache.source_stamp(root / "qmatvec" / "kernels.py")


# a fresh process: load a cached spark_lab kernel (its bitcode left unparsed), run it, then compile a
# new function that calls it, which links the loaded library into the new one (the bitcode parsed then)
_LINK_CHILD = r"""
import json
import numpy as np
import numba
from spark_lab import numba_cache
from spark_lab.llm import decode
rms = decode._glue()["rms_row"]
x = np.linspace(-2, 3, 64, dtype=np.float32); w = np.linspace(0.5, 1.5, 64, dtype=np.float32)
out = np.empty(64, np.float32)
rms(x, w, np.float32(1e-6), out)
lib = rms.overloads[rms.signatures[0]].library
lazy = getattr(lib, "_spark_lab_bitcode", None) is not None
@numba.njit
def outer(x, w, out):
    rms(x, w, np.float32(1e-6), out)
    return out * np.float32(2.0)
twice = outer(x, w, np.empty(64, np.float32))
print(json.dumps({"lazy_module": numba_cache._LAZY, "bitcode_unparsed": lazy, "y": out.tolist(), "twice": twice.tolist()}))
"""


def test_cached_kernels_parse_their_bitcode_only_to_link():
    import os
    import numpy as np
    runs = []
    for extra in ({}, {}, {"SPARK_LAB_NUMBA_REFRESH": "1"}):    # the first may compile into the cache
        r = subprocess.run([sys.executable, "-c", _LINK_CHILD], capture_output=True, text=True,
                           env=dict(os.environ, **extra), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    fast, slow = runs[1], runs[2]
    assert fast["lazy_module"] and fast["bitcode_unparsed"]      # loaded without parsing its bitcode
    assert not slow["bitcode_unparsed"]                          # numba's own load
    assert fast["y"] == slow["y"] and fast["twice"] == slow["twice"] == (2 * np.array(fast["y"], np.float32)).tolist()


_ELF_CHILD = r"""
import json
import numpy as np
from llvmlite import binding as ll
from spark_lab import numba_cache
from spark_lab.llm import decode
seen, read = [], numba_cache.elf_symbols
numba_cache.elf_symbols = lambda obj: seen.append(obj) or read(obj)   # the object the short load reads
rms = decode._glue()["rms_row"]
x = np.ones(8, np.float32)
rms(x, x, np.float32(1e-6), np.empty(8, np.float32))
lib = rms.overloads[rms.signatures[0]].library
bitcode = getattr(lib, "_spark_lab_bitcode", None)
out = {"lazy": bitcode is not None}
if bitcode is not None:
    names = read(seen[-1])
    assert names <= lib._codegen._engine._defined_symbols
    funcs = list(ll.parse_bitcode(bitcode).functions)
    out["exported"] = sorted(f.name for f in funcs if not f.is_declaration
                             and f.linkage in (ll.Linkage.external, ll.Linkage.linkonce_odr))
    out["declared"] = sorted(f.name for f in funcs if f.is_declaration)
    out["names"] = sorted(names)
print(json.dumps(out))
"""


def test_elf_symbols_are_the_defined_functions_of_the_bitcode():
    """What the short load reads from the object's symbol table covers every function the module
    exports, and names none that it only declares (a kernel loaded from the cache in a fresh process)."""
    for _ in range(2):                                               # the first may compile into the cache
        r = subprocess.run([sys.executable, "-c", _ELF_CHILD], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["lazy"]
    names = set(got["names"])
    assert got["exported"] and set(got["exported"]) <= names and not names & set(got["declared"])
    assert numba_cache.elf_symbols(b"not an object") is None


def test_only_spark_lab_dispatchers_skip_the_extension_scan():
    import numba.core.dispatcher as dispatcher
    import numba.core.entrypoints as entrypoints
    hook = dispatcher._DispatcherBase._compilation_chain_init_hook
    assert getattr(hook, "_spark_lab", False)                       # installed by spark_lab's import hook
    calls = []
    orig, entrypoints.init_all = entrypoints.init_all, lambda: calls.append(1)
    try:
        from spark_lab.llm import decode
        hook(decode._glue()["rms_row"])                               # ours: no scan
        assert calls == []
        hook(numba.njit(lambda x: x))                                 # anyone else's: numba's own hook
        assert calls == [1]
    finally:
        entrypoints.init_all = orig
