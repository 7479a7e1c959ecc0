"""spark_lab: a Jupyter-first lab kit for local AI, on its own kernels (NumPy or CuPy)."""
__version__ = "0.1.0"

from .device import get_device, get_xp, to_device, to_host, synchronize, device_info  # noqa: F401
from .memory import get_allocator  # noqa: F401

from .device import DeviceError as _DeviceError, set_threads as _set_threads
from .numba_cache import install as _fast_kernel_loads
from .numba_threads import preload as _tbb_preload

try:  # SPARK_LAB_THREADS, when set, pins BLAS and numba threads for the whole process
    _set_threads()
except _DeviceError:
    pass  # a bad value is reported by whoever calls set_threads() explicitly (the CLI does)
_fast_kernel_loads()  # cached kernels load without numba's registry refresh (numba_cache.py)
_tbb_preload()  # numba's TBB layer when installed: parallel kernels launched from any thread (numba_threads.py)
