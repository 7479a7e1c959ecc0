"""The unified-memory allocator: one budget, tagged allocations, stats and a time series.

On a GPU every array the kit makes (weights, KV cache, activations) comes from one CuPy
memory pool whose raw blocks are *managed* memory (`cudaMallocManaged`). Oversubscribing
managed memory can hang a GPU (on a GB10 an OOM can freeze the whole machine), so requests
are refused up front, in three places, none of which asks CUDA for anything:
  1. `Allocator.check`: in use + asked > budget -> MemoryError naming the three numbers;
  2. the pool's limit (`MemoryPool.set_limit(budget)`) covers every CuPy temporary too;
  3. the raw allocator will not ask for more than the device has free right now.
On the CPU the same API hands out NumPy arrays and does the same accounting.

    alloc = get_allocator()
    w = alloc.place(host_weights, tag="weights")     # host -> device, accounted
    kv = alloc.zeros((layers, 2, ctx, kv_dim), tag="kv_cache")
    with alloc.track() as t:
        ...                                           # t.peak, t.series for plots
    alloc.stats()                                     # in use, peak, by tag, capacity, budget

An array stops being counted when `free(arr)` is called or when the array object handed out
is garbage collected (a view taken from it does not keep it counted).
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from .device import get_device, gpu_memory, gpu_properties, meminfo

TAGS = ("weights", "kv_cache", "activations", "scratch", "other")


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as memory is sized)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class MemoryStats:
    in_use: int                 # bytes handed out and not yet freed
    peak: int                   # highest in_use since creation (or reset_peak)
    by_tag: dict                # tag -> bytes in use
    capacity: int               # bytes the machine could give the kit now, plus what it holds
    budget: int                 # the most the allocator will ever hand out
    device: str                 # "cpu" or "cuda"
    pool_reserved: int = 0      # GPU: bytes the pool holds from CUDA (in use + cached + temporaries)

    def summary(self) -> str:
        tags = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.by_tag.items() if v)
        return (f"{self.device}: {fmt_bytes(self.in_use)} in use (peak {fmt_bytes(self.peak)}) of "
                f"{fmt_bytes(self.budget)} budget" + (f" [{tags}]" if tags else ""))


@dataclass
class Tracker:
    """What `Allocator.track()` records: the peak inside the block and one sample per change."""
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
        self._live: dict[int, tuple[int, str, weakref.finalize]] = {}  # id(array) -> (nbytes, tag, finalizer)
        self.in_use = 0
        self.peak = 0
        self.by_tag: dict[str, int] = dict.fromkeys(TAGS, 0)
        self._trackers: list[Tracker] = []
        self._pool = _managed_pool() if self.device.kind == "cuda" else None   # strict: host memory, no pool
        self.budget = int(budget) if budget is not None else int(self.capacity() * fraction)

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, nbytes: int) -> None:
        self._budget = int(nbytes)
        if self._pool is not None:
            self._pool.set_limit(size=self._budget)  # CuPy refuses beyond this before calling malloc

    def capacity(self) -> int:
        """Bytes the machine could give us now plus what we already hold.

        Unified machines (CPU, GB10) count MemAvailable from /proc/meminfo: cudaMemGetInfo
        there misses memory the page cache could give back. Discrete GPUs use cudaMemGetInfo.
        """
        if self._pool is not None:
            return gpu_memory()["available"] + int(self._pool.total_bytes())
        return int(meminfo().get("MemAvailable", 0)) + self.in_use

    # ---------------------------------------------------------------- accounting
    def check(self, nbytes: int, tag: str = "other", what: str = "") -> None:
        """Refuse, before anything is allocated, a request that would go over the budget."""
        if self.in_use + nbytes > self.budget:
            label = f" for {what}" if what else ""
            raise MemoryError(
                f"out of memory budget: asked {fmt_bytes(nbytes)} ({tag}){label}, "
                f"{fmt_bytes(self.in_use)} in use, budget {fmt_bytes(self.budget)}")

    def _account(self, arr, nbytes: int, tag: str):
        fin = weakref.finalize(arr, self._release, id(arr))  # counted until the object dies
        fin.atexit = False
        self._live[id(arr)] = (nbytes, tag, fin)
        self.in_use += nbytes
        self.by_tag[tag] = self.by_tag.get(tag, 0) + nbytes
        self.peak = max(self.peak, self.in_use)
        self._record()
        return arr

    def _release(self, key: int) -> None:
        with self._lock:
            nbytes, tag, _ = self._live.pop(key)
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
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            self.check(nbytes, tag, what)
            return self._account(self.device.xp.empty(shape, dtype=dtype), nbytes, tag)

    def zeros(self, shape, dtype=np.float32, tag: str = "activations", what: str = ""):
        arr = self.empty(shape, dtype, tag, what)
        arr[...] = 0
        return arr

    def place(self, host_array, tag: str = "weights", what: str = "", dtype=None):
        """Put an array (often a zero-copy memmap view) on the device, counted under `tag`.

        CPU: no copy (a memmapped GGUF stays on disk until touched); the caller gets a new
        view object, so the caller's own array is never tagged. GPU: a copy into pool memory,
        prefetched to the device. An optional dtype cast happens on the host, before the copy.
        """
        on_gpu = hasattr(host_array, "__cuda_array_interface__")
        a = host_array if on_gpu else np.asarray(host_array)  # a memmap becomes a plain ndarray view
        if dtype is not None and a.dtype != np.dtype(dtype):
            a = a.astype(dtype)
        nbytes = int(a.nbytes)
        with self._lock:
            self.check(nbytes, tag, what)
            if on_gpu or not self.device.is_gpu:  # already where it belongs: count a new view, no copy
                return self._account(a.view(), nbytes, tag)
            out = self.device.xp.empty(a.shape, dtype=a.dtype)
            _prefetch(out)  # pages land on the GPU first, then the copy writes them there
            out.set(np.ascontiguousarray(a))
            return self._account(out, nbytes, tag)

    def free(self, arr) -> None:
        """Stop counting `arr` now (its memory returns when the last reference goes)."""
        with self._lock:
            entry = self._live.get(id(arr))
            if entry is None or not entry[2].alive:
                raise ValueError("free(): this array was not handed out by the allocator, or was already freed")
            entry[2].detach()
            self._release(id(arr))

    # ---------------------------------------------------------------- reporting
    def stats(self) -> MemoryStats:
        reserved = int(self._pool.total_bytes()) if self._pool is not None else self.in_use
        return MemoryStats(self.in_use, self.peak, dict(self.by_tag), self.capacity(), self.budget,
                           self.device.kind, reserved)

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

_CUDA_ERROR_MEMORY_ALLOCATION = 2   # cudaErrorMemoryAllocation (CuPy 14 no longer names it)


def _managed_pool():
    """A CuPy MemoryPool over managed memory that never asks for more than the GPU has free."""
    import cupy as cp

    def malloc_managed(size: int):
        if size > gpu_memory()["available"]:
            # look like a failed cudaMalloc: the pool frees its cached blocks and retries,
            # then raises cupy's OutOfMemoryError (a MemoryError)
            raise cp.cuda.runtime.CUDARuntimeError(_CUDA_ERROR_MEMORY_ALLOCATION)
        return cp.cuda.malloc_managed(size)

    pool = cp.cuda.MemoryPool(malloc_managed)
    cp.cuda.set_allocator(pool.malloc)
    return pool


def _prefetch(arr) -> None:
    """Hint the driver to migrate managed pages to the GPU now rather than on first touch."""
    if arr.nbytes == 0 or not gpu_properties().get("concurrentManagedAccess", 0):
        return  # prefetch needs concurrent managed access (absent on Jetson-class parts)
    import cupy as cp
    # CuPy keeps (ptr, count, device, stream) across CUDA 12 and 13 (where the C call takes a cudaMemLocation)
    cp.cuda.runtime.memPrefetchAsync(arr.data.ptr, arr.nbytes, arr.device.id, cp.cuda.get_current_stream().ptr)


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
