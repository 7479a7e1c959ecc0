"""A strict stand-in for CuPy on the CPU: `SPARK_LAB_DEVICE=strict`.

It proves the GPU path without a GPU. Arrays "on the device" are `DeviceArray`s, thin
wrappers over NumPy arrays that behave as `cupy.ndarray` does where it matters:

- implicit conversion to a host array raises, as CuPy does: `np.asarray(x)`, `np.array(x)`
  (`__array__` raises TypeError), a host array mixed into a device operation (`x + host`,
  `x[...] = host`, `xp.concatenate([x, host])`), and a numba kernel given a device array;
- CuPy's implicit synchronising reads are allowed but counted as device-to-host copies:
  `float(x)`, `int(x)`, `bool(x)` and `.item()` on one element, `.tolist()`, `repr(x)`;
- explicit moves are counted with their sizes in `TRANSFERS`: `xp.asnumpy(x)` / `x.get()`
  (device to host) and `xp.asarray(host)` / `x.set(host)` / indexing with a host index
  array (host to device);
- `RawModule(code=...).get_function(name)(grid, block, args)` runs the NumPy twin that
  `kernels.cuda_kernels.TWINS` names for each CUDA kernel, so the CuPy wrappers (argument
  packing, output allocation, strides) run as they do on a GPU.

A wrapper rather than an ndarray subclass: a subclass *is* an ndarray, so every NumPy
function, `np.asarray`, buffer-protocol consumer and numba kernel would take it silently
(numba reads the buffer directly), which is the very thing this device must catch. The
wrapper keeps NumPy's own arithmetic (`__array_ufunc__` / `__array_function__` forward to
NumPy after unwrapping), so results equal the NumPy backend's bit for bit.

`xp` (the module-like object `device.get_device().xp` returns here) calls itself "cupy":
kernels choose their CuPy paths by `xp.__name__`, and those are the paths to prove. Only
`spark_lab.device` imports this module.
"""
from __future__ import annotations

import math
import re
import traceback
import types
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

_SCALARS = (bool, int, float, complex, np.generic)


# ---------------------------------------------------------------------------- transfers

@dataclass(frozen=True)
class Transfers:
    """A snapshot of the counter: copies and bytes each way, and kernel launches by name."""
    d2h: int = 0
    d2h_bytes: int = 0
    h2d: int = 0
    h2d_bytes: int = 0
    launches: dict = field(default_factory=dict)

    def __sub__(self, other: "Transfers") -> "Transfers":
        names = set(self.launches) | set(other.launches)
        return Transfers(self.d2h - other.d2h, self.d2h_bytes - other.d2h_bytes, self.h2d - other.h2d,
                         self.h2d_bytes - other.h2d_bytes,
                         {k: self.launches.get(k, 0) - other.launches.get(k, 0) for k in names
                          if self.launches.get(k, 0) != other.launches.get(k, 0)})


class TransferCounter:
    """Counts every copy between host and the stand-in device (one process-wide instance).

    `trace = True` also keeps where each copy came from (`log`: (kind, nbytes, "file:line fn")),
    the first thing to read when a count is higher than it should be.
    """

    def __init__(self):
        self.trace = False
        self.reset()

    def reset(self) -> None:
        self.d2h = self.d2h_bytes = self.h2d = self.h2d_bytes = 0
        self.launches: Counter = Counter()
        self.log: list = []

    def snapshot(self) -> Transfers:
        return Transfers(self.d2h, self.d2h_bytes, self.h2d, self.h2d_bytes, dict(self.launches))

    def _add(self, kind: str, nbytes: int) -> None:
        if kind == "d2h":
            self.d2h += 1
            self.d2h_bytes += int(nbytes)
        else:
            self.h2d += 1
            self.h2d_bytes += int(nbytes)
        if self.trace:
            frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.endswith("device_strict.py")]
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            self.log.append((kind, int(nbytes), where))


TRANSFERS = TransferCounter()


# ---------------------------------------------------------------------------- the array

def _host_error(what: str) -> TypeError:
    return TypeError(f"{what}: a host (NumPy) array cannot be used on the device implicitly; "
                     "move it with xp.asarray() first (SPARK_LAB_DEVICE=strict, as CuPy)")


def _unwrap(a, what: str):
    """Device arrays -> their buffers; scalars pass; host arrays raise (recursing into lists/tuples)."""
    if isinstance(a, DeviceArray):
        return a._a
    if isinstance(a, np.ndarray):
        if a.ndim == 0:                  # CuPy takes a 0-d NumPy array as a scalar
            return a
        raise _host_error(what)
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(x, what) for x in a)
    return a


def _wrap(r):
    """NumPy results -> device arrays (NumPy scalars too: CuPy reductions return 0-d arrays)."""
    if isinstance(r, np.ndarray):
        return DeviceArray(r)
    if isinstance(r, np.generic):
        return DeviceArray(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, list):
        return [_wrap(x) for x in r]
    return r


def _index(key):
    """An index for a device array: device index arrays unwrap; host ones are copied over (as CuPy)."""
    if isinstance(key, DeviceArray):
        return key._a
    if isinstance(key, np.ndarray) or (isinstance(key, list) and key and not isinstance(key[0], slice)):
        a = np.asarray(key)
        TRANSFERS._add("h2d", a.nbytes)
        return a
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key


class DeviceArray:
    """An array on the stand-in device; see the module docstring for what it refuses."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0            # a NumPy scalar on the left defers to our reflected ops

    def __init__(self, a: np.ndarray):
        self._a = a

    # ---- attributes that cost nothing on a GPU either
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DeviceArray(self._a.T))
    real = property(lambda self: DeviceArray(self._a.real))
    device = property(lambda self: types.SimpleNamespace(id=0))
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.__array_interface__["data"][0]))  # not a host buffer

    @property
    def __cuda_array_interface__(self):   # what code probes to tell device arrays from host ones
        return {"shape": self._a.shape, "typestr": self._a.dtype.str, "strides": self._a.strides,
                "data": (self._a.__array_interface__["data"][0], False), "version": 3}

    # ---- explicit moves (counted)
    def get(self, stream=None, order="C", out=None) -> np.ndarray:
        TRANSFERS._add("d2h", self._a.nbytes)
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def set(self, arr, stream=None) -> None:
        if isinstance(arr, DeviceArray):
            raise TypeError("set(): expects a host (NumPy) array, got a device array")
        arr = np.asarray(arr)
        if arr.shape != self._a.shape:
            raise ValueError(f"set(): shape {arr.shape} does not match the device array's {self._a.shape}")
        TRANSFERS._add("h2d", arr.nbytes)
        self._a[...] = arr

    # ---- implicit conversions: refused where CuPy refuses, counted where CuPy syncs
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
                        "construct a NumPy array explicitly. (SPARK_LAB_DEVICE=strict, as CuPy)")

    def _scalar(self):
        if self._a.size != 1:
            raise TypeError(f"only size-1 arrays can be converted to Python scalars (shape {self._a.shape})")
        TRANSFERS._add("d2h", self._a.itemsize)
        return self._a.reshape(()).item()

    def __float__(self):
        return float(self._scalar())

    def __int__(self):
        return int(self._scalar())

    def __complex__(self):
        return complex(self._scalar())

    def __bool__(self):
        if self._a.size == 0:
            return False
        return bool(self._scalar())

    def item(self):
        if self._a.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self._scalar()

    def tolist(self):
        TRANSFERS._add("d2h", self._a.nbytes)
        return self._a.tolist()

    def tobytes(self, order="C"):
        TRANSFERS._add("d2h", self._a.nbytes)
        return self._a.tobytes(order)

    def __repr__(self):
        return repr(self.get()).replace("array(", "device_array(", 1)

    __str__ = lambda self: str(self.get())                                    # noqa: E731

    def __format__(self, spec):
        return format(self.get(), spec)

    # ---- containers
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, DeviceArray):
            value = value._a
        elif isinstance(value, np.ndarray) and value.ndim > 0:
            raise _host_error("x[...] = host array")
        elif isinstance(value, (list, tuple)):
            raise _host_error("x[...] = list")
        self._a[_index(key)] = value

    # ---- NumPy protocols: NumPy does the arithmetic, on unwrapped buffers
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        kwargs = {k: _unwrap(v, f"{ufunc.__name__}({k}=)") for k, v in kwargs.items()}   # where=, out=, ...
        raw = [_unwrap(x, f"{ufunc.__name__}()") for x in inputs]
        r = getattr(ufunc, method)(*raw, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(r)

    def __array_function__(self, func, types_, args, kwargs):
        return _device_fn(func, func.__name__)(*args, **kwargs)

    # ---- every other ndarray method: unwrap the arguments, wrap the results
    def __getattr__(self, name):
        if name.startswith("__"):     # __array_interface__, __array_struct__, __dlpack__: host views, refused
            raise AttributeError(f"device array has no attribute {name!r}")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            args = _unwrap(args, f"ndarray.{name}()")
            kwargs = {k: _unwrap(v, f"ndarray.{name}({k}=)") for k, v in kwargs.items()}
            return _wrap(attr(*args, **kwargs))
        return method

    def __reduce__(self):
        raise TypeError("a device array cannot be pickled implicitly; .get() it first")


def _binary(uf, reflected=False, inplace=False):
    def op(self, other):
        if isinstance(other, (np.ndarray, list)) and not (isinstance(other, np.ndarray) and other.ndim == 0):
            raise _host_error(f"{uf.__name__}() with a host operand")
        if not isinstance(other, (DeviceArray, np.ndarray) + _SCALARS):
            return NotImplemented
        o = _unwrap(other, uf.__name__)
        if inplace:
            uf(self._a, o, out=self._a)
            return self
        return _wrap(uf(o, self._a) if reflected else uf(self._a, o))
    return op


for _name, _uf in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                   ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power),
                   ("matmul", np.matmul), ("and", np.bitwise_and), ("or", np.bitwise_or),
                   ("xor", np.bitwise_xor), ("lshift", np.left_shift), ("rshift", np.right_shift)]:
    setattr(DeviceArray, f"__{_name}__", _binary(_uf))
    setattr(DeviceArray, f"__r{_name}__", _binary(_uf, reflected=True))
    if _name != "matmul":
        setattr(DeviceArray, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                   ("gt", np.greater), ("ge", np.greater_equal)]:
    setattr(DeviceArray, f"__{_name}__", _binary(_uf))
for _name, _uf in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute), ("invert", np.invert)]:
    setattr(DeviceArray, f"__{_name}__", lambda self, _uf=_uf: DeviceArray(_uf(self._a)))
DeviceArray.__hash__ = None


# ---------------------------------------------------------------------------- kernels

class RawModule:
    """`cupy.RawModule` stand-in: its kernels run the NumPy twins in `kernels.cuda_kernels.TWINS`."""

    def __init__(self, code: str = "", options=(), **kwargs):
        self.code = code
        self.names = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', code))

    def get_function(self, name: str) -> "RawKernel":
        if name not in self.names:
            raise RuntimeError(f"RawModule: no extern \"C\" __global__ kernel named {name!r} in this source")
        return RawKernel(name)


class RawKernel:
    def __init__(self, name: str):
        from .kernels.cuda_kernels import TWINS      # lazy: the kernels import device, which imports us
        if name not in TWINS:
            raise RuntimeError(f"CUDA kernel {name!r} has no NumPy twin in kernels.cuda_kernels.TWINS")
        self.name, self.twin = name, TWINS[name]

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None):
        if not all(isinstance(a, (DeviceArray,) + _SCALARS) for a in args):
            bad = next(a for a in args if not isinstance(a, (DeviceArray,) + _SCALARS))
            raise TypeError(f"kernel {self.name}: unsupported argument type {type(bad).__name__} "
                            "(a kernel takes device arrays and scalars only)")
        TRANSFERS.launches[self.name] += 1
        self.twin(*(a._a if isinstance(a, DeviceArray) else a for a in args))


# ---------------------------------------------------------------------------- the module

def _erf(x):
    """erf for `cupyx.scipy.special.erf`'s place in gelu (math.erf per element: exact, slow)."""
    return _wrap(np.frompyfunc(math.erf, 1, 1)(_unwrap(x, "erf")).astype(x.dtype))


_CREATE = {"asarray", "array", "ascontiguousarray", "asanyarray", "asfortranarray"}
_PASS = {"dtype", "result_type", "can_cast", "promote_types", "iinfo", "finfo", "isscalar", "ndim", "shape",
         "issubdtype", "errstate", "broadcast_shapes"}


class _CUDA:
    """The bits of `cupy.cuda` the kit reads (device properties, memory, streams)."""

    class runtime:
        CUDARuntimeError = RuntimeError
        errorMemoryAllocation = 2

        @staticmethod
        def getDeviceCount():
            return 1

        @staticmethod
        def getDeviceProperties(i):
            return {"name": b"spark_lab strict stand-in (host memory)", "major": 0, "minor": 0,
                    "integrated": 1, "managedMemory": 1, "concurrentManagedAccess": 0}

        @staticmethod
        def memGetInfo():
            from .device import meminfo
            m = meminfo()
            return m.get("MemAvailable", 0), m.get("MemTotal", 0)

        @staticmethod
        def runtimeGetVersion():
            return 0

        driverGetVersion = runtimeGetVersion

    class Device:
        def __init__(self, i=0):
            self.id = i

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def get_current_stream():
        return types.SimpleNamespace(synchronize=lambda: None, ptr=0)


class _StrictXP:
    """The array module: NumPy's functions behind CuPy's rules (see the module docstring)."""

    __name__ = "cupy"                 # kernels pick their CuPy paths by this name
    __version__ = f"strict-{np.__version__}"
    ndarray = DeviceArray
    RawModule = RawModule
    cuda = _CUDA
    erf = staticmethod(_erf)          # cupyx.scipy.special.erf's stand-in (kernels.activations.gelu)
    transfers = TRANSFERS

    def __repr__(self):
        return "<spark_lab.device_strict: a CuPy stand-in on the CPU>"

    @staticmethod
    def asnumpy(a, stream=None, order="C", out=None):
        if isinstance(a, DeviceArray):
            return a.get(order=order, out=out)
        return np.asarray(a, order=order)

    @staticmethod
    def get_array_module(*args):
        return xp if any(isinstance(a, DeviceArray) for a in args) else np

    def __getattr__(self, name):
        attr = getattr(np, name)
        if name in ("linalg", "fft"):                 # submodules: their functions run on the device too
            return types.SimpleNamespace(**{k: _device_fn(v, k) for k, v in vars(attr).items()
                                            if callable(v) and not isinstance(v, type) and not k.startswith("_")})
        if isinstance(attr, type) or not callable(attr) or name in _PASS:
            return attr                      # dtypes, constants, type helpers
        if name in _CREATE:
            def create(a, dtype=None, *args, **kwargs):
                if isinstance(a, DeviceArray):
                    return DeviceArray(attr(a._a, dtype, *args, **kwargs))
                r = np.array(attr(a, dtype, *args, **kwargs), copy=True)     # the device's own copy
                TRANSFERS._add("h2d", r.nbytes)
                return DeviceArray(r)
            return create
        return _device_fn(attr, name)


def _device_fn(func, name: str):
    """A NumPy function run on device arrays: host arrays refused, results left on the device."""
    def fn(*args, **kwargs):
        args = _unwrap(args, f"cupy.{name}()")
        kwargs = {k: _unwrap(v, f"cupy.{name}({k}=)") for k, v in kwargs.items()}
        return _wrap(func(*args, **kwargs))
    fn.__name__ = name
    return fn


xp = _StrictXP()
