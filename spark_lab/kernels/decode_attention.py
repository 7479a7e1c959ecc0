"""One query token against a KV cache on the CPU: a numba kernel for decoding.

`attention()`'s NumPy body is the reference; for a single query its dozen small array
operations (transposes, a mask, softmax passes) cost more than the arithmetic, so decode takes
this fused loop instead: scores, a stable softmax and the weighted sum of values, per head, in
one pass over the visible keys. Same numbers as the reference to float32 rounding.
"""
from __future__ import annotations

import numpy as np

_KERNEL = None  # compiled on first use; False when numba is missing


exp_parts = None   # kernels.expf.exp_parts compiled for inlining, set by _compile()


def _attend(q, k, v, scale, lo, hi, out):
    # q [Hq, D], k/v [Tk, Hkv, D], out [Hq, Dv]; keys lo..hi-1 are visible
    Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    n = hi - lo
    s = np.empty(n, np.float32)
    bits = np.empty(n, np.int32)                     # 2^n factors of the exponentials
    two = bits.view(np.float32)
    for h in range(Hq):
        g = h // G
        m = np.float32(-np.inf)
        for j in range(n):                           # scores and their max
            acc = np.float32(0.0)
            for d in range(D):
                acc += q[h, d] * k[lo + j, g, d]
            acc *= scale
            s[j] = acc
            m = max(m, acc)
        for j in range(n):                           # exp(s - m): a polynomial, vectorized
            s[j], bits[j] = exp_parts(s[j] - m)
        tot = np.float32(0.0)
        for j in range(n):
            e = s[j] * two[j]
            s[j] = e
            tot += e
        inv = np.float32(1.0) / tot
        for d in range(Dv):
            out[h, d] = 0.0
        for j in range(n):                           # weighted values
            w = s[j] * inv
            for d in range(Dv):
                out[h, d] += w * v[lo + j, g, d]


def _compile():
    """Compile (or load from numba's cache) the kernel; False without numba."""
    global _KERNEL
    from .expf import njit_with_exp
    _KERNEL = njit_with_exp(_attend)       # reassociated sums vectorize; ~1e-7 relative
    return _KERNEL


def attention_one(q, k, v, scale: float, lo: int, hi: int):
    """q [1, Hq, D] f32, k/v [Tk, Hkv, D] f32 -> [1, Hq, Dv], or None when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False or hi <= lo:
        return None
    out = np.empty((1, q.shape[1], v.shape[2]), np.float32)
    kern(np.ascontiguousarray(q[0]), k, v, np.float32(scale), lo, hi, out[0])
    return out


def attention_into(q, k, v, scale: float, lo: int, hi: int, out) -> bool:
    """q [Hq, D], k/v [Tk, Hkv, D] (keys lo..hi-1 visible) -> out [Hq, Dv], in place.
    False (out untouched) when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False or hi <= lo:
        return False
    kern(q, k, v, np.float32(scale), lo, hi, out)
    return True
