"""One query token against a KV cache on the CPU: a numba kernel for decoding.

`attention()`'s NumPy body is the reference; for a single query its dozen small array
operations (transposes, a mask, softmax passes) cost more than the arithmetic, so decode takes
this fused loop instead: scores, a stable softmax and the weighted sum of values, in one pass
over the visible keys. Same numbers as the reference to float32 rounding.

At long context the cache, not the weights, is what a step reads (an 8B model at 16k tokens:
64 MB of f32 keys per layer), so the loop walks the cache in memory order (a position's keys
of every KV head, then the next position: a stride of one head's row would cross a page per
key), reads each key and value row once for all the query heads that share it (grouped-query
attention), and splits long contexts into NCHUNK runs of keys on separate threads, whose partial
softmaxes are combined at the end. The chunk bounds depend on NCHUNK and the key count only
(not on the threads available) and chunks are combined in index order, so a result never depends
on timing or thread count. Rows are widened on the fly from the cache's storage type:

    f32    float32 [Tk, Hkv, D]
    f16    uint16 float16 bits [Tk, Hkv, D]
    q8_0   int8 [Tk, Hkv, D] with float32 scales [Tk, Hkv, D/32]

16 values per step by `kv_rows.widen16` (VCVTPH2PS for f16, sign-extend + convert x block scale
for q8_0) when D is a multiple of 16, else a scalar loop (f16 by integer shifts). Scores are kept
head-major so the softmax's max and exp passes read them in order. Per layer at 16k keys,
Llama-3-8B shapes, one thread (CPU ms, `python -m spark_lab.benchmarks.attention`): f16 22.8 ->
~17, q8_0 24.9 -> ~13; what is left is arithmetic (the scores' dot products ~6 ms, the value
sums ~7 ms), not memory: the cache streams at well under the machine's bandwidth. NaN scores
give NaN outputs (numba's "numpy" error model), never a ZeroDivisionError.
"""
from __future__ import annotations

from functools import partial

import numpy as np

_KERNEL = None  # compiled on first use; False when numba is missing
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # bits -> value
_NO_SCALE = np.zeros((1, 1, 1), np.float32)

exp_parts = None   # kernels.expf.exp_parts compiled for inlining, set by _compile()
prange = range     # numba.prange once compiled
load_row = None    # _load_row compiled (dtype-dispatched), set by _compile()
widen_row = None   # _widen_row compiled (dtype-dispatched, kv_rows.widen16), set by _compile()
NCHUNK = 2         # key chunks at long context (threads; one chunk under 512 keys)


def _load_row(a, s, tab, j, g, row):
    """row [D] f32 = a[j, g, :] widened (f32 copy / f16 bits via tab / q8_0 codes * scales)."""
    for d in range(row.shape[0]):
        row[d] = a[j, g, d]


def _widen_row(a, sc, j, g, row):
    """row [D] f32 = a[j, g, :] widened 16 values per step (D a multiple of 16, a C-contiguous);
    q8_0 codes times their block's scale sc[j, g, d // 32]."""
    for d in range(row.shape[0]):
        row[d] = a[j, g, d]


def _attend(q, k, ks, v, vs, tab, scale, lo, hi, out):
    # q [Hq, D], k/v [Tk, Hkv, D] (storage above), out [Hq, Dv]; keys lo..hi-1 are visible
    Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    n = hi - lo
    vec_k, vec_v = D % 16 == 0, Dv % 16 == 0
    nc = min(NCHUNK, max(1, n // 256))               # key chunks, one per thread: memory read in order
    cm = np.empty((nc, Hq), np.float32)              # each chunk's max score, sum of exps, weighted values
    cl = np.empty((nc, Hq), np.float32)
    co = np.empty((nc, Hq, Dv), np.float32)
    for c in prange(nc):
        j0, j1 = lo + c * n // nc, lo + (c + 1) * n // nc
        m_ = j1 - j0
        s = np.empty((Hq, m_), np.float32)           # scores, head-major: the softmax reads them in order
        e = np.empty((Hq, m_), np.float32)
        bits = np.empty((Hq, m_), np.int32)          # 2^n factors of the exponentials
        two = bits.view(np.float32)
        krow = np.empty(D, np.float32)
        vrow = np.empty(Dv, np.float32)
        qs = np.empty((Hq, D), np.float32)           # q * scale: the score needs no multiply per key
        for h in range(Hq):
            for d in range(D):
                qs[h, d] = q[h, d] * scale
        for j in range(m_):                          # scores, a row of all KV heads at a time
            for g in range(Hkv):
                if vec_k:
                    widen_row(k, ks, j0 + j, g, krow)
                else:
                    load_row(k, ks, tab, j0 + j, g, krow)
                for hh in range(G):
                    h = g * G + hh
                    acc = np.float32(0.0)
                    for d in range(D):
                        acc += qs[h, d] * krow[d]
                    s[h, j] = acc
        for h in range(Hq):
            mh = np.float32(-np.inf)
            for j in range(m_):
                mh = max(mh, s[h, j])
            for j in range(m_):                      # exp(s - m): a polynomial, vectorized
                e[h, j], bits[h, j] = exp_parts(s[h, j] - mh)
            tot = np.float32(0.0)
            for j in range(m_):
                x = e[h, j] * two[h, j]
                e[h, j] = x
                tot += x
            cm[c, h], cl[c, h] = mh, tot
        o = co[c]
        o[...] = 0.0
        for j in range(m_):                          # weighted values
            for g in range(Hkv):
                if vec_v:
                    widen_row(v, vs, j0 + j, g, vrow)
                else:
                    load_row(v, vs, tab, j0 + j, g, vrow)
                for hh in range(G):
                    h = g * G + hh
                    w = e[h, j]
                    for d in range(Dv):
                        o[h, d] += w * vrow[d]
    for h in range(Hq):                              # chunks combined: rescaled to the global max
        M = cm[0, h]
        for c in range(1, nc):
            M = max(M, cm[c, h])
        tot = np.float32(0.0)
        for d in range(Dv):
            out[h, d] = 0.0
        for c in range(nc):
            f = np.float32(np.exp(cm[c, h] - M)) if nc > 1 else np.float32(1.0)
            tot += f * cl[c, h]
            for d in range(Dv):
                out[h, d] += f * co[c, h, d]
        inv = np.float32(1.0) / tot
        for d in range(Dv):
            out[h, d] *= inv


def _compile():
    """Compile (or load from numba's cache) the kernel; False without numba."""
    global _KERNEL, prange, load_row, widen_row
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
                # exponent and mantissa moved to float32's places, times 2^112 (rebias: exact for
                # normals and subnormals), then the sign; three loops that vectorize
                bits = row.view(np.uint32)
                for d in range(row.shape[0]):
                    bits[d] = (np.uint32(a[j, g, d]) & np.uint32(0x7fff)) << np.uint32(13)
                for d in range(row.shape[0]):
                    row[d] *= np.float32(5.192296858534828e+33)
                for d in range(row.shape[0]):
                    bits[d] |= (np.uint32(a[j, g, d]) & np.uint32(0x8000)) << np.uint32(16)
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
    if widen_row is None:
        from .kv_rows import widen16_intrinsic
        overload(_widen_row, inline="always")(partial(_widen_ov, widen16_intrinsic()))
        widen_row = _widen_row
    prange = numba.prange
    _KERNEL = njit_with_exp(_attend, parallel=True)   # reassociated sums vectorize; ~1e-7 relative
    return _KERNEL


def _widen_ov(widen16, a, sc, j, g, row):
    from numba import types
    if a.dtype == types.int8:
        def q8(a, sc, j, g, row):
            D = row.shape[0]
            base = (j * a.shape[1] + g) * D
            for b in range(D // 16):
                widen16(a, base + 16 * b, sc[j, g, b // 2], row, 16 * b)
        return q8

    def flt(a, sc, j, g, row):
        D = row.shape[0]
        base = (j * a.shape[1] + g) * D
        for b in range(D // 16):
            widen16(a, base + 16 * b, np.float32(1.0), row, 16 * b)
    return flt


def _args(k, v, k_scale=None, v_scale=None):
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)         # rows are read 16 values at a flat offset
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
