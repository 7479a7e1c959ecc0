"""Which array module runs the work: CuPy when a usable GPU is present, else NumPy.

`SPARK_LAB_DEVICE=auto|cpu|cuda|strict` (default auto) picks the backend once per process;
`strict` is the CPU stand-in for CuPy in `device_strict.py` (tests: it refuses implicit host
conversions and counts every transfer), imported only here and only when asked for.
A machine with CuPy installed but no driver is a CPU machine: importing CuPy works there,
`cupy.cuda.is_available()` is False and the first allocation would raise, so auto falls back.
Moves between host and device are always explicit: `to_device`, `to_host`.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass, field

import numpy as np


class DeviceError(RuntimeError):
    """The requested device cannot be used (one clear line, no traceback in the CLI)."""


@dataclass(frozen=True)
class Device:
    kind: str                      # "cpu", "cuda" or "strict" (CuPy's stand-in on the CPU)
    xp: object = field(repr=False)  # the array module: numpy, cupy or device_strict.xp
    name: str = ""                 # e.g. "NVIDIA GB10" or the CPU model

    @property
    def is_gpu(self) -> bool:
        """True where arrays live apart from the host: a GPU, or the strict stand-in of one."""
        return self.kind in ("cuda", "strict")


def _requested() -> str:
    want = os.environ.get("SPARK_LAB_DEVICE", "auto").strip().lower() or "auto"
    if want not in ("auto", "cpu", "cuda", "strict"):
        raise DeviceError(f"SPARK_LAB_DEVICE={want!r} is not one of auto, cpu, cuda, strict")
    return want


def _probe_cuda():
    """Return (cupy, None) when a GPU really works, else (None, reason)."""
    try:
        import cupy
    except Exception as e:  # not installed, or a broken install
        return None, f"CuPy is not importable ({type(e).__name__}: {e})".splitlines()[0]
    try:
        if not cupy.cuda.is_available():
            return None, "CuPy is installed but no CUDA device or driver is available"
        cupy.cuda.runtime.getDeviceCount()
        cupy.empty(1, dtype=cupy.float32)  # the first allocation is where a missing driver bites
    except Exception as e:
        return None, f"CUDA is not usable ({type(e).__name__}: {e})".splitlines()[0]
    return cupy, None


@functools.lru_cache(maxsize=None)
def get_device() -> Device:
    """Detect the device once; cached for the life of the process."""
    want = _requested()
    if want == "cpu":
        return Device("cpu", np, _cpu_name())
    if want == "strict":
        from .device_strict import xp as strict_xp
        return Device("strict", strict_xp, "strict CuPy stand-in on " + _cpu_name())
    cupy, why = _probe_cuda()
    if cupy is None:
        if want == "cuda":
            raise DeviceError(f"SPARK_LAB_DEVICE=cuda but {why}; unset it or use SPARK_LAB_DEVICE=cpu")
        return Device("cpu", np, _cpu_name())
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Device("cuda", cupy, name)


def reset_device_cache() -> None:
    """Forget the detected device (tests change SPARK_LAB_DEVICE between cases)."""
    get_device.cache_clear()
    gpu_properties.cache_clear()


def get_xp():
    """The array module of the current device (numpy or cupy)."""
    return get_device().xp


def array_module(*arrays):
    """numpy or cupy, whichever the given arrays live in (numpy for host arrays and scalars)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy
            return cupy
        if mod == "spark_lab.device_strict":
            return sys.modules[mod].xp
    return np


def transfers():
    """The strict device's transfer counter (`reset()`, `snapshot()`), or None on other devices."""
    dev = get_device()
    return dev.xp.transfers if dev.kind == "strict" else None


def to_device(a, dtype=None):
    """Host -> current device (a no-op on the CPU, apart from an optional dtype cast)."""
    xp = get_xp()
    if xp is np:
        return np.asarray(to_host(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def to_host(a) -> np.ndarray:
    """Device -> host NumPy array (a no-op for NumPy arrays)."""
    if array_module(a) is np:
        return np.asarray(a)
    return a.get()


def synchronize() -> None:
    """Wait for the GPU to finish queued work (timings need it); nothing to do on the CPU."""
    dev = get_device()
    if dev.is_gpu:
        dev.xp.cuda.get_current_stream().synchronize()


# ---------------------------------------------------------------------------- threads

def set_threads(n: int | None = None) -> int | None:
    """Pin BLAS (and numba) threads; `SPARK_LAB_THREADS` is read when n is None.

    On a busy 2-core machine two BLAS threads can be 10-100x slower than one, so the
    thread count is something a user must be able to choose. Returns the count pinned
    (None when neither n nor the variable is given: the libraries keep their defaults).
    """
    global _threads
    if n is None:
        env = os.environ.get("SPARK_LAB_THREADS", "").strip()
        if not env:
            return None
        try:
            n = int(env)
        except ValueError:
            raise DeviceError(f"SPARK_LAB_THREADS={env!r} is not an integer") from None
    if n < 1:
        raise DeviceError(f"thread count must be >= 1, got {n}")
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=n)  # every BLAS/OpenMP pool loaded so far
    numba = sys.modules.get("numba")  # importing numba here would cost a second at every start
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    else:
        os.environ["NUMBA_NUM_THREADS"] = str(n)  # read by numba when it is imported later
    _threads = n
    return n


_threads: int | None = None  # what set_threads pinned last


def num_threads() -> int:
    """Threads the kit's own parallel kernels should use."""
    if _threads is not None:
        return _threads
    env = os.environ.get("SPARK_LAB_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------- info

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo() -> dict:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...); psutil where there is no /proc."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                parts = rest.split()
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        import psutil
        vm = psutil.virtual_memory()
        out = {"MemTotal": vm.total, "MemAvailable": vm.available}
    return out


def _blas_info() -> list[dict]:
    from threadpoolctl import threadpool_info
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure the BLAS library is loaded
    return [
        {"library": i.get("internal_api"), "version": i.get("version"), "threads": i.get("num_threads"),
         "user_api": i.get("user_api")}
        for i in threadpool_info()
    ]


def _cuda_api():
    """cupy, or the strict stand-in's copy of the bits of cupy.cuda the kit reads (not get_device():
    the managed pool asks for these while get_device() probes)."""
    if _requested() == "strict":
        from .device_strict import xp as strict_xp
        return strict_xp
    import cupy
    return cupy


@functools.lru_cache(maxsize=None)
def gpu_properties() -> dict:
    """cudaGetDeviceProperties of the current GPU (cached: it does not change)."""
    cp = _cuda_api()
    return cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)


def gpu_memory() -> dict:
    """The GPU's memory now: total, available, and whether it is the host's memory.

    On unified/integrated GPUs (GB10, Jetson) CPU and GPU share one pool of DRAM and
    cudaMemGetInfo does not count what the page cache could give back, so "available" is
    MemAvailable from /proc/meminfo; on a discrete card it is cudaMemGetInfo's free.
    """
    cp = _cuda_api()  # not get_device(): its probe allocates through the pool that calls this
    free, total = cp.cuda.runtime.memGetInfo()
    unified = bool(gpu_properties().get("integrated", 0))
    available = meminfo().get("MemAvailable", free) if unified else free
    return {"total": int(total), "available": int(available), "unified": unified}


def cupy_choice() -> dict:
    """Which CuPy extra (`cuda13`, `cuda12` or none) `make setup` chose for this environment and why
    (`cuda_setup.py`); detected now where setup recorded nothing (a pip install by hand)."""
    import importlib.util
    from . import cuda_setup
    found = cuda_setup.recorded()
    source = "make setup"
    if found is None:
        source = "detected now"
        try:
            found = cuda_setup.detect()
        except ValueError as e:
            found = {"extra": None, "reason": str(e)}
    return {"extra": found.get("extra"), "reason": found.get("reason", ""), "source": source,
            "cupy_installed": importlib.util.find_spec("cupy") is not None}


def device_info() -> dict:
    """Everything `spark-lab info` reports about the device, as plain JSON-able values."""
    dev = get_device()
    mem = meminfo()
    info = {
        "device": dev.kind,
        "name": dev.name,
        "cupy_extra": cupy_choice(),
        "numpy": np.__version__,
        "host_memory_total": mem.get("MemTotal"),
        "host_memory_available": mem.get("MemAvailable"),
        "cpu_cores": os.cpu_count(),
        "threads": num_threads(),
        "blas": _blas_info(),
    }
    if dev.is_gpu:
        cp = dev.xp
        props = gpu_properties()
        gm = gpu_memory()
        info.update({
            "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_total": gm["total"],
            "memory_available": gm["available"],
            "unified_memory": gm["unified"],
            "managed_memory": bool(props.get("managedMemory", 0)),
            "concurrent_managed_access": bool(props.get("concurrentManagedAccess", 0)),
            "cupy": cp.__version__,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        })
    else:
        info.update({
            "memory_total": mem.get("MemTotal"),
            "memory_available": mem.get("MemAvailable"),
            "unified_memory": True,  # host arrays: CPU and "device" are the same memory
        })
    return info
