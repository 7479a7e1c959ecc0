"""The unified-memory allocator: one budget, tagged allocations, stats and a time series.

On a GPU every array the kit makes (weights, KV cache, activations) comes from one CuPy
memory pool whose raw allocations are *managed* memory (`cudaMallocManaged`), so a model
larger than the card's free memory is refused up front instead of oversubscribing (which can
hang a GPU; on a GB10 an OOM can freeze the whole machine). The budget is checked *before*
CUDA is asked. On the CPU the same API hands out NumPy arrays and does the same accounting.

    alloc = get_allocator()
    w = alloc.place(host_weights, tag="weights")     # host -> device, accounted
    kv = alloc.zeros((layers, 2, ctx, kv_dim), tag="kv_cache")
    with alloc.track() as t:
        ...                                           # t.peak, t.series for plots
    alloc.stats()                                     # in use, peak, by tag, capacity, budget
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from .device import get_device, meminfo

TAGS = ("weights", "kv_cache", "activations", "scratch", "other")


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as memory is sized)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class MemoryStats:
    in_use: int                 # bytes handed out and not yet freed
    peak: int                   # highest in_use since creation (or reset_peak)
    by_tag: dict                # tag -> bytes in use
    capacity: int               # bytes this machine can give the kit right now (plus what it holds)
    budget: int                 # the most the allocator will ever hand out
    device: str                 # "cpu" or "cuda"
    pool_reserved: int = 0      # GPU: bytes the pool holds from CUDA (>= in_use)

    def summary(self) -> str:
        tags = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.by_tag.items() if v)
        return (f"{self.device}: {fmt_bytes(self.in_use)} in use (peak {fmt_bytes(self.peak)}) of "
                f"{fmt_bytes(self.budget)} budget" + (f" [{tags}]" if tags else ""))


@dataclass
class Tracker:
    """What `Allocator.track()` records: the peak inside the block and (t, in_use, by_tag) samples."""
    start_in_use: int
    peak: int
    series: list = field(default_factory=list)   # [(seconds since start, in_use, {tag: bytes})]
    t0: float = field(default_factory=time.perf_counter)

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start_in_use


class Allocator:
    def __init__(self, budget: int | None = None, fraction: float = 0.9):
        self.device = get_device()
        self._lock = threading.RLock()
        self._live: dict[int, tuple[int, str, object, int]] = {}  # key -> (nbytes, tag, finalizer, id(array))
        self._keys: dict[int, int] = {}                              # id(array) -> key, for free()
        self._next_key = 0
        self.in_use = 0
        self.peak = 0
        self.by_tag: dict[str, int] = {t: 0 for t in TAGS}
        self._trackers: list[Tracker] = []
        cap = self.capacity()
        self.budget = int(budget) if budget is not None else int(cap * fraction)
        self._pool = None
        if self.device.is_gpu:
            self._pool = _managed_pool(self)

    # ---------------------------------------------------------------- capacity
    def capacity(self) -> int:
        """Bytes the machine could give us now plus what we already hold.

        Unified machines (CPU, GB10) read MemAvailable from /proc/meminfo: cudaMemGetInfo
        there does not see memory the page cache could give back. Discrete GPUs use cudaMemGetInfo.
        """
        held = getattr(self, "in_use", 0)
        if self.device.is_gpu:
            from .device import device_info
            info = device_info()
            free = info["memory_available"]
            return int(free) + held
        return int(meminfo().get("MemAvailable", 0)) + held

    # ---------------------------------------------------------------- accounting
    def check(self, nbytes: int, tag: str = "other", what: str = "") -> None:
        """Refuse, before anything is allocated, a request that would go over the budget."""
        if self.in_use + nbytes > self.budget:
            label = f" for {what}" if what else ""
            raise MemoryError(
                f"out of memory budget: asked {fmt_bytes(nbytes)} ({tag}){label}, "
                f"{fmt_bytes(self.in_use)} in use, budget {fmt_bytes(self.budget)}")

    def _account(self, arr, nbytes: int, tag: str):
        if tag not in self.by_tag:
            self.by_tag[tag] = 0
        with self._lock:
            key = self._next_key
            self._next_key += 1
            self.in_use += nbytes
            self.by_tag[tag] += nbytes
            self.peak = max(self.peak, self.in_use)
            try:
                ref = weakref.finalize(arr, self._release, key)
                ref.atexit = False
            except TypeError:  # not weak-referenceable: held until free() is called
                ref = None
            self._live[key] = (nbytes, tag, ref, id(arr))
            self._keys[id(arr)] = key
            self._record()
        return arr

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is None:
                return
            nbytes, tag, _, arr_id = entry
            if self._keys.get(arr_id) == key:
                del self._keys[arr_id]
            self.in_use -= nbytes
            self.by_tag[tag] -= nbytes
            self._record()

    def _record(self) -> None:
        for t in self._trackers:
            t.peak = max(t.peak, self.in_use)
            t.series.append((time.perf_counter() - t.t0, self.in_use, dict(self.by_tag)))

    # ---------------------------------------------------------------- allocation
    def empty(self, shape, dtype=np.float32, tag: str = "activations", what: str = ""):
        """An uninitialised array on the device, counted under `tag`."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.check(nbytes, tag, what)
        arr = self.device.xp.empty(shape, dtype=dtype)
        return self._account(arr, nbytes, tag)

    def zeros(self, shape, dtype=np.float32, tag: str = "activations", what: str = ""):
        arr = self.empty(shape, dtype, tag, what)
        arr[...] = 0
        return arr

    def place(self, host_array, tag: str = "weights", what: str = "", dtype=None):
        """Put a host array (often a zero-copy memmap view) on the device, counted under `tag`.

        On the CPU this keeps the array as it is (no copy: a memmapped GGUF stays on disk
        until touched); on a GPU it copies into pool memory and prefetches it to the device.
        """
        a = np.asarray(host_array) if not hasattr(host_array, "__cuda_array_interface__") else host_array
        if dtype is not None and a.dtype != np.dtype(dtype):
            a = a.astype(dtype)
        nbytes = int(a.nbytes)
        self.check(nbytes, tag, what)
        if not self.device.is_gpu:
            if not isinstance(a, np.ndarray) or type(a) is not np.ndarray:
                a = a.view(np.ndarray)  # a fresh view object we can tag without touching the caller's
            else:
                a = a.view()
            return self._account(a, nbytes, tag)
        out = self.device.xp.asarray(a)
        _prefetch(out)
        return self._account(out, nbytes, tag)

    def free(self, arr) -> None:
        """Stop counting `arr` now (its memory returns when the last reference goes)."""
        key = self._keys.get(id(arr))
        if key is None:
            raise ValueError("free(): this array was not handed out by the allocator (or was already freed)")
        entry = self._live.get(key)
        if entry and entry[2] is not None:
            entry[2].detach()
        self._release(key)

    # ---------------------------------------------------------------- reporting
    def stats(self) -> MemoryStats:
        reserved = int(self._pool.total_bytes()) if self._pool is not None else self.in_use
        return MemoryStats(self.in_use, self.peak, {k: v for k, v in self.by_tag.items()},
                           self.capacity(), self.budget, self.device.kind, reserved)

    def reset_peak(self) -> None:
        self.peak = self.in_use

    @contextlib.contextmanager
    def track(self):
        """Record the peak and a time series of in-use bytes inside the block."""
        t = Tracker(start_in_use=self.in_use, peak=self.in_use)
        t.series.append((0.0, self.in_use, dict(self.by_tag)))
        self._trackers.append(t)
        try:
            yield t
        finally:
            self._trackers.remove(t)
            t.series.append((time.perf_counter() - t.t0, self.in_use, dict(self.by_tag)))


# -------------------------------------------------------------------- GPU pool

def _managed_pool(alloc: Allocator):
    """A CuPy MemoryPool whose raw blocks are managed memory, with the budget checked first."""
    import cupy as cp

    def malloc(size: int):
        reserved = pool.total_bytes()
        if reserved + size > alloc.budget:
            pool.free_all_blocks()  # give cached blocks back, then try once more
            if pool.total_bytes() + size > alloc.budget:
                raise MemoryError(
                    f"out of memory budget: CUDA pool asked for {fmt_bytes(size)}, "
                    f"{fmt_bytes(pool.total_bytes())} reserved, budget {fmt_bytes(alloc.budget)}")
        return cp.cuda.malloc_managed(size)

    pool = cp.cuda.MemoryPool(malloc)
    cp.cuda.set_allocator(pool.malloc)
    return pool


def _prefetch(arr) -> None:
    """Hint the driver to migrate managed pages to the GPU now rather than on first touch."""
    try:
        import cupy as cp
        dev = cp.cuda.Device().id
        cp.cuda.runtime.memPrefetchAsync(arr.data.ptr, arr.nbytes, dev, cp.cuda.get_current_stream().ptr)
    except Exception:
        pass  # a hint only: some platforms/CUDA versions lack it


_ALLOCATOR: Allocator | None = None
_ALLOC_LOCK = threading.Lock()


def get_allocator() -> Allocator:
    """The process-wide allocator (created on first use, on the detected device)."""
    global _ALLOCATOR
    with _ALLOC_LOCK:
        if _ALLOCATOR is None:
            _ALLOCATOR = Allocator()
        return _ALLOCATOR


def reset_allocator(budget: int | None = None) -> Allocator:
    """Start a fresh process-wide allocator (tests; a notebook that wants a new budget)."""
    global _ALLOCATOR
    with _ALLOC_LOCK:
        _ALLOCATOR = Allocator(budget)
        return _ALLOCATOR
