"""Load spark_lab's cached numba kernels without numba's full registry refresh (cold start).

numba's `Cache.load_overload` calls `target_context.refresh()` before it reads a kernel from its
disk cache. The first refresh in a process imports and installs every typing and lowering registry
numba has (cffi, typed containers, random, polynomials, ...): ~0.25 s and ~10 MB of a cold
`spark-lab generate` that only loads compiled code. Loading compiled code needs only numba's
runtime (NRT) symbols registered with LLVM; compiling still refreshes everything, because numba's
compiler pipeline calls refresh() itself when a kernel is not in the cache.

`install()` swaps in that lighter load for caches of spark_lab's own sources only (any other
package's kernels load as numba does it). It is applied when numba's caching module is first
imported (spark_lab/__init__.py registers the import hook), so every kernel module is covered
without each one calling it. The same hook keeps numba's import from importing coverage.py when no
coverage measurement is running (`_without_coverage`). SPARK_LAB_NUMBA_REFRESH=1 keeps numba's own
behaviour for both.

The same patch widens what a cached kernel's validity depends on. numba keys a cache entry on a
hash of the one source file that defines the function, but spark_lab's kernels are assembled from
their package's other modules (`qmatvec/kernels.py` calls the LLVM-IR intrinsics of `simd.py`,
`decode_attention.py` those of `attn_blocks.py` and `kv_rows.py`): an edit there, or an upgrade
that changes only them, loaded the old machine code. `source_stamp(path)` hashes the file and,
recursively, every module of its own package that it imports (`from .x import`, `from . import x`,
at any indent), so such a change recompiles.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path

PACKAGE = str(Path(__file__).resolve().parent) + os.sep
MODULE = "numba.core.caching"


def _ours(cache) -> bool:
    code = getattr(getattr(cache, "_py_func", None), "__code__", None)
    return code is not None and os.path.abspath(code.co_filename).startswith(PACKAGE)


_LOCAL_IMPORT = re.compile(r"^[ \t]*from (\.+)([\w.]*) import ([\w, ()]+)", re.M)


def local_imports(path: Path) -> list[Path]:
    """The modules of path's own package (and its subpackages: `from .sub.mod import`, and a parent
    package's: `from ..kernels.expf import`) that path imports (files that exist), in source order."""
    out = []
    for dots, mod, names in _LOCAL_IMPORT.findall(path.read_text(encoding="utf-8")):
        base = path.parents[len(dots) - 1]
        names = [n.split(" as ")[0].strip() for n in names.strip("()").split(",")]
        cands = [mod] + [f"{mod}.{n}" for n in names] if mod else names     # a module, or a package's modules
        out += [p for p in (base.joinpath(*c.split(".")).with_suffix(".py") for c in cands if c) if p.is_file()]
    return out


def source_stamp(path) -> bytes:
    """sha256 over the contents of path and of the same-package modules it imports, recursively.
    Each file is read once per process and (size, mtime): qmatvec/kernels.py alone defines ~20 kernels."""
    seen, todo, h = set(), [Path(path).resolve()], hashlib.sha256()
    while todo:
        p = todo.pop(0)
        if p in seen:
            continue
        seen.add(p)
        st = p.stat()
        body, imports = _read(p, st.st_size, st.st_mtime_ns)
        h.update(p.name.encode() + b"\0" + body)
        todo += imports
    return h.digest()


@functools.lru_cache(maxsize=256)
def _read(p: Path, size: int, mtime_ns: int) -> tuple[bytes, list[Path]]:
    return p.read_bytes(), local_imports(p)


def patch(caching) -> bool:
    """Wrap caching.Cache.load_overload; False (nothing changed) when its shape is not the known one."""
    cls = getattr(caching, "Cache", None)
    orig = getattr(cls, "load_overload", None)
    if orig is None or getattr(orig, "_spark_lab", False) or not hasattr(cls, "_load_overload") \
            or not hasattr(cls, "_guard_against_spurious_io_errors"):
        return False

    def load_overload(self, sig, target_context):
        if not _ours(self):
            return orig(self, sig, target_context)
        from numba.core.runtime import rtsys
        rtsys.initialize(target_context)           # NRT symbols: what loaded code calls into
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        # None when the guard swallowed an I/O error: the dispatcher then compiles (and refreshes)

    load_overload._spark_lab = True
    load_overload.__doc__ = orig.__doc__
    cls.load_overload = load_overload

    init = cls.__init__

    def __init__(self, py_func):
        init(self, py_func)
        cache_file = getattr(self, "_cache_file", None)
        if _ours(self) and hasattr(cache_file, "_source_stamp"):
            try:
                cache_file._source_stamp = source_stamp(py_func.__code__.co_filename)
            except OSError:                         # a source that cannot be read: numba's own stamp stays
                pass

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return True


def _without_coverage(run):
    """exec_module for numba's package: numba imports coverage.py when it is installed, to report
    jitted lines to a running measurement (numba.misc.coverage_support). When no measurement has
    imported coverage before numba, that import only costs a cold start (~50 ms, ~4 MB, 40 modules
    with sqlite3): it is refused for the duration of numba's import, and coverage stays importable."""
    def exec_module(module):
        block = "coverage" not in sys.modules
        if block:
            sys.modules["coverage"] = None          # `import coverage` raises ImportError meanwhile
        try:
            run(module)
        finally:
            if block and sys.modules.get("coverage", 0) is None:
                del sys.modules["coverage"]
    return exec_module


class _Hook:
    """A sys.meta_path finder (importlib.abc.MetaPathFinder's protocol; importing importlib.abc costs
    ~10 ms): wraps numba's own import (coverage, above) and patches numba.core.caching right after it
    is first imported, by whoever imports numba."""

    def __init__(self):
        self.todo = {MODULE} | ({"numba"} if "numba" not in sys.modules else set())

    def find_spec(self, name, path=None, target=None):
        if name not in self.todo:
            return None
        self.todo.discard(name)
        import importlib.util
        if self in sys.meta_path:
            sys.meta_path.remove(self)              # the real finders answer
        try:
            spec = importlib.util.find_spec(name)
        finally:
            if self.todo:
                sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module
        if name == "numba":
            spec.loader.exec_module = _without_coverage(run)
        else:
            def exec_module(module):
                run(module)
                patch(module)
            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Patch now if numba is already imported, else when it is (a no-op under SPARK_LAB_NUMBA_REFRESH=1)."""
    if os.environ.get("SPARK_LAB_NUMBA_REFRESH", "") not in ("", "0"):
        return
    if MODULE in sys.modules:
        patch(sys.modules[MODULE])
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
