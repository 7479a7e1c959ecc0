"""e^a for numba loops, as a float32 polynomial that LLVM vectorizes (numba's np.exp is a scalar
libm call: in a softmax over a few hundred keys it was most of the time).

    p, bits = exp_parts(a)       # e^a = p * (bits viewed as float32), a clamped to [-87, 88]

Range reduction a = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two so n ln2 stays exact), then
e^r by its degree-7 Taylor polynomial (relative error < 2e-7 on that interval) and 2^n built
from its exponent bits. The caller keeps `bits` in an int32 array and multiplies through a
float32 view of it in a second loop: numba has no scalar bit cast, and both loops vectorize.
Below -87, e^a is returned as e^-87 (~1.6e-38): softmax weights that small are zero to float32.
"""
from __future__ import annotations

import numpy as np

LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
LO, HI = np.float32(-87.0), np.float32(88.0)


def exp_parts(a):
    """a float32 -> (p float32, bits int32) with e^a = p * float32-from-bits(bits)."""
    a = min(max(a, LO), HI)
    n = np.floor(a * LOG2E + np.float32(0.5))
    r = a - n * LN2_HI - n * LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p, (np.int32(n) + np.int32(127)) << np.int32(23)


_JIT = None


def jitted():
    """exp_parts compiled for inlining into other numba functions; None without numba."""
    global _JIT
    if _JIT is None:
        try:
            import numba
        except ImportError:
            _JIT = False
            return None
        _JIT = numba.njit(inline="always", cache=True, nogil=True, fastmath=True)(exp_parts)
    return _JIT or None


def njit_with_exp(fn, **options):
    """Compile the module-level kernel `fn`, which calls `exp_parts` (a name in its module),
    with numba (cache, fastmath, nogil, plus `options`); False without numba. Module-level,
    not a closure, so that numba's cache finds it again in the next process."""
    inline = jitted()
    if inline is None:
        return False
    import numba
    fn.__globals__["exp_parts"] = inline
    # error_model numpy: a row whose scores are all NaN (weights from a damaged file) divides by a zero
    # sum and gets NaN, as NumPy would, instead of raising ZeroDivisionError out of the kernel
    return numba.njit(cache=True, fastmath=True, nogil=True, **{"error_model": "numpy", **options})(fn)
