"""One query token against a KV cache on the CPU: a numba kernel for decoding.

`attention()`'s NumPy body is the reference; for a single query its dozen small array
operations (transposes, a mask, softmax passes) cost more than the arithmetic, so decode takes
this fused loop instead: scores, a stable softmax and the weighted sum of values, in one pass
over the visible keys. Same numbers as the reference to float32 rounding.

At long context the cache, not the weights, is what a step reads (an 8B model at 16k tokens:
64 MB of f32 keys per layer), so the loop runs per KV head (threads split the KV heads) and
each key and value row is read from memory once for all the query heads that share it
(grouped-query attention), widened on the fly from the cache's storage type:

    f32    float32 [Tk, Hkv, D]
    f16    uint16 float16 bits [Tk, Hkv, D], widened through a 65536-entry table (256 KB, in L2)
    q8_0   int8 [Tk, Hkv, D] with float32 scales [Tk, Hkv, D/32]
"""
from __future__ import annotations

import numpy as np

_KERNEL = None  # compiled on first use; False when numba is missing
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # bits -> value
_NO_SCALE = np.zeros((1, 1, 1), np.float32)

exp_parts = None   # kernels.expf.exp_parts compiled for inlining, set by _compile()
prange = range     # numba.prange once compiled
load_row = None    # _load_row compiled (dtype-dispatched), set by _compile()


def _load_row(a, s, tab, j, g, row):
    """row [D] f32 = a[j, g, :] widened (f32 copy / f16 bits via tab / q8_0 codes * scales)."""
    for d in range(row.shape[0]):
        row[d] = a[j, g, d]


def _attend(q, k, ks, v, vs, tab, scale, lo, hi, out):
    # q [Hq, D], k/v [Tk, Hkv, D] (storage above), out [Hq, Dv]; keys lo..hi-1 are visible
    Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    n = hi - lo
    for g in prange(Hkv):
        s = np.empty(G * n, np.float32)
        bits = np.empty(G * n, np.int32)             # 2^n factors of the exponentials
        two = bits.view(np.float32)
        row = np.empty(max(D, Dv), np.float32)
        m = np.full(G, -np.inf, np.float32)
        for j in range(n):                           # scores (one read of each key row) and their max
            load_row(k, ks, tab, lo + j, g, row[:D])
            for hh in range(G):
                acc = np.float32(0.0)
                for d in range(D):
                    acc += q[g * G + hh, d] * row[d]
                acc *= scale
                s[hh * n + j] = acc
                m[hh] = max(m[hh], acc)
        acc_o = np.zeros((G, Dv), np.float32)
        inv = np.empty(G, np.float32)
        for hh in range(G):
            tot = np.float32(0.0)
            for j in range(n):                       # exp(s - m): a polynomial, vectorized
                s[hh * n + j], bits[hh * n + j] = exp_parts(s[hh * n + j] - m[hh])
            for j in range(n):
                e = s[hh * n + j] * two[hh * n + j]
                s[hh * n + j] = e
                tot += e
            inv[hh] = np.float32(1.0) / tot
        for j in range(n):                           # weighted values (one read of each value row)
            load_row(v, vs, tab, lo + j, g, row[:Dv])
            for hh in range(G):
                w = s[hh * n + j]
                for d in range(Dv):
                    acc_o[hh, d] += w * row[d]
        for hh in range(G):
            for d in range(Dv):
                out[g * G + hh, d] = acc_o[hh, d] * inv[hh]


def _compile():
    """Compile (or load from numba's cache) the kernel; False without numba."""
    global _KERNEL, prange, load_row
    try:
        import numba
        from numba import types
        from numba.extending import overload
    except ImportError:
        _KERNEL = False
        return _KERNEL
    from .expf import njit_with_exp

    def _ov(a, s, tab, j, g, row):
        if a.dtype == types.uint16:
            def f16(a, s, tab, j, g, row):
                for d in range(row.shape[0]):
                    row[d] = tab[a[j, g, d]]
            return f16
        if a.dtype == types.int8:
            def q8(a, s, tab, j, g, row):
                for d in range(row.shape[0]):
                    row[d] = np.float32(a[j, g, d]) * s[j, g, d // 32]
            return q8
        def f32(a, s, tab, j, g, row):
            for d in range(row.shape[0]):
                row[d] = a[j, g, d]
        return f32
    if load_row is None:
        overload(_load_row, inline="always")(_ov)
        load_row = _load_row
    prange = numba.prange
    _KERNEL = njit_with_exp(_attend, parallel=True)   # reassociated sums vectorize; ~1e-7 relative
    return _KERNEL


def _args(k, v, k_scale=None, v_scale=None):
    return (k, _NO_SCALE if k_scale is None else k_scale, v, _NO_SCALE if v_scale is None else v_scale, _F16)


def attention_one(q, k, v, scale: float, lo: int, hi: int, k_scale=None, v_scale=None):
    """q [1, Hq, D] f32, k/v [Tk, Hkv, D] -> [1, Hq, Dv], or None when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False or hi <= lo:
        return None
    out = np.empty((1, q.shape[1], v.shape[2]), np.float32)
    k_, ks, v_, vs, tab = _args(k, v, k_scale, v_scale)
    kern(np.ascontiguousarray(q[0]), k_, ks, v_, vs, tab, np.float32(scale), lo, hi, out[0])
    return out


def attention_into(q, k, v, scale: float, lo: int, hi: int, out, k_scale=None, v_scale=None) -> bool:
    """q [Hq, D], k/v [Tk, Hkv, D] (keys lo..hi-1 visible; f32, f16 bits as uint16, or int8
    with k_scale/v_scale [Tk, Hkv, D/32]) -> out [Hq, Dv], in place.
    False (out untouched) when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False or hi <= lo:
        return False
    k_, ks, v_, vs, tab = _args(k, v, k_scale, v_scale)
    kern(q, k_, ks, v_, vs, tab, np.float32(scale), lo, hi, out)
    return True
