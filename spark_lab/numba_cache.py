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
coverage measurement is running (`_without_coverage`), spark_lab's dispatchers skip numba's scan of
installed packages for extensions (`patch_dispatcher`), and a spark_lab kernel loaded from the cache
leaves the LLVM bitcode stored beside its machine code unparsed until something links it
(`_lazy_linking`). SmolLM2's cold first token loads three kernels: 152 -> 56-90 ms.
SPARK_LAB_NUMBA_REFRESH=1 keeps numba's own behaviour for all of these.

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
import threading
from pathlib import Path

PACKAGE = str(Path(__file__).resolve().parent) + os.sep
MODULE = "numba.core.caching"


def _ours(cache) -> bool:
    return _ours_func(getattr(cache, "_py_func", None))


def _ours_func(func) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and os.path.abspath(code.co_filename).startswith(PACKAGE)


DISPATCHER = "numba.core.dispatcher"


def patch_dispatcher(dispatcher) -> bool:
    """numba's first compile or cache load in a process runs `entrypoints.init_all`, which scans every
    installed distribution's metadata for numba extensions (~17 ms with JupyterLab's ~200 packages).
    spark_lab's kernels use no extension types, so their dispatchers skip it; any other function's
    first compile still runs it. False (nothing changed) when numba's shape is not the known one."""
    cls = getattr(dispatcher, "_DispatcherBase", None)
    orig = getattr(cls, "_compilation_chain_init_hook", None)
    if orig is None or getattr(orig, "_spark_lab", False):
        return False

    def _compilation_chain_init_hook(self):
        if not _ours_func(getattr(self, "py_func", None)):
            orig(self)

    _compilation_chain_init_hook._spark_lab = True
    cls._compilation_chain_init_hook = _compilation_chain_init_hook
    return True


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
    """sha256 over the contents of path and of the same-package modules it imports, recursively, and
    SPARK_LAB_VNNI (it picks the int8 code the kernels compile to; numba's own key holds the CPU's
    features, not that override: one run with it set had left the portable code in the cache for the
    next). Each file is read once per process and (size, mtime): qmatvec/kernels.py alone defines ~20 kernels."""
    seen, todo, h = set(), [Path(path).resolve()], hashlib.sha256()
    h.update(b"SPARK_LAB_VNNI=" + os.environ.get("SPARK_LAB_VNNI", "1").encode() + b"\0")
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
        lazy = _lazy_linking()
        with self._guard_against_spurious_io_errors():
            _LOADING.ours = lazy
            try:
                return self._load_overload(sig, target_context)
            finally:
                _LOADING.ours = False
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


# ---------------------------------------------------------------------------- lazy linking module
# A cached kernel is stored as its machine code (an ELF object) plus the LLVM bitcode of its whole
# module, which numba parses on every load: to learn which symbols the library defines, and to have
# IR at hand should a later compile link this library into another. That parse was ~15 ms per
# kernel of a cold process (47 ms of SmolLM2's first token, for three kernels). For spark_lab's own
# kernels, on ELF platforms, the defined symbols are read from the object's symbol table instead and
# the bitcode is parsed only if something links the library. Anything unexpected takes numba's path.

_LOADING = threading.local()    # .ours: a spark_lab cache entry is being loaded on this thread
_LAZY = None                    # _lazy_linking(): the codegen patch applied (True), or not possible


def elf_symbols(obj: bytes) -> set | None:
    """Names of the symbols an ELF64 little-endian object defines (its .symtab), or None when obj is
    not one (then numba's own path reads the bitcode)."""
    import struct
    if len(obj) < 64 or obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _, kind, _, _, off, size, link, _, _, entsize in secs:
        if kind != 2 or not entsize:                 # SHT_SYMTAB
            continue
        stroff = secs[link][4]
        for at in range(off, off + size, entsize):
            name, _, _, shndx = struct.unpack_from("<IBBH", obj, at)
            if shndx and name:                       # defined (not SHN_UNDEF), named
                end = obj.index(b"\0", stroff + name)
                names.add(obj[stroff + name:end].decode("utf-8", "replace"))
    return names


def _lazy_linking() -> bool:
    """Patch numba's CPU code library once: object-cached libraries loaded while `_LOADING.ours`
    keep their bitcode unparsed until `_get_module_for_linking` needs it. False where numba's
    codegen does not have the known shape (then nothing is changed)."""
    global _LAZY
    if _LAZY is None:
        _LAZY = False
        try:
            from numba.core import codegen
            from llvmlite import binding as ll
            cls = codegen.CPUCodeLibrary
            unserialize, for_linking = cls.__dict__["_unserialize"], cls._get_module_for_linking
        except (ImportError, AttributeError, KeyError):
            return False
        if not isinstance(unserialize, classmethod):
            return False
        orig_unserialize = unserialize.__func__

        def _unserialize(klass, cg, state):
            name, kind, data = state
            if kind != "object" or not getattr(_LOADING, "ours", False):
                return orig_unserialize(klass, cg, state)
            object_code, shared_bitcode = data
            symbols = elf_symbols(object_code)
            engine = getattr(cg, "_engine", None)
            if symbols is None or not hasattr(engine, "_defined_symbols"):
                return orig_unserialize(klass, cg, state)
            self = cg.create_library(name)
            self.enable_object_caching()
            self._set_compiled_object(object_code)
            self._spark_lab_bitcode = shared_bitcode
            self._finalize_final_module()
            engine._defined_symbols |= symbols
            return self

        def _get_module_for_linking(self):
            bitcode = getattr(self, "_spark_lab_bitcode", None)
            if bitcode is not None and self._shared_module is None:
                self._shared_module = ll.parse_bitcode(bitcode)
                self._spark_lab_bitcode = None
            return for_linking(self)

        cls._unserialize = classmethod(_unserialize)
        cls._get_module_for_linking = _get_module_for_linking
        _LAZY = True
    return _LAZY


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
        self.todo = {MODULE, DISPATCHER} | ({"numba"} if "numba" not in sys.modules else set())

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
            after = patch if name == MODULE else patch_dispatcher

            def exec_module(module):
                run(module)
                after(module)
            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Patch now if numba is already imported, else when it is (a no-op under SPARK_LAB_NUMBA_REFRESH=1)."""
    if os.environ.get("SPARK_LAB_NUMBA_REFRESH", "") not in ("", "0"):
        return
    if MODULE in sys.modules:
        patch(sys.modules[MODULE])
        if DISPATCHER in sys.modules:
            patch_dispatcher(sys.modules[DISPATCHER])
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
