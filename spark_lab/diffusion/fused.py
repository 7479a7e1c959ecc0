"""numba fast paths for the UNet's attention: one fused pass per query row, no score matrix.

spark-emoji has 32 heads of dimension 4, so a [heads, T, T] score block is mostly softmax
passes (max, subtract, exp, sum, divide) over memory; here each query row's scores live in a
small buffer: scores, then exp and the sum, then the weighted values, each a vectorized loop.
The stabilising shift is an upper bound of the row's scores, sum_d |q_d| max_j |k_dj|, not
the max (a max reduction does not vectorize in numba: it cost as much as all the rest); if the
bound is so loose that every exp underflows (sum < 1e-20) the row is redone with the true max.
NumPy's exp is SIMD but numba's is a scalar libm call, so exp is a Cephes-style polynomial
(n = round(x / ln 2), r = x - n ln 2, degree-7 Taylor for e^r, 2^n from the exponent bits)
that LLVM vectorizes: relative error ~1e-7, like float32 itself. `attend` in attention.py
(NumPy: matmul + softmax + matmul) stays the reference and the fallback without numba.
"""
from __future__ import annotations

import numpy as np

_KERNELS = None   # compiled on first use; False when numba is missing


def _compile():
    global _KERNELS
    try:
        import numba
    except ImportError:
        _KERNELS = False
        return _KERNELS

    @numba.njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
    def attend_rows(q, kt, vt, out):
        # q [BH, Tq, D] (pre-scaled), kt/vt [BH, D, Tk], out [BH, Tq, Dv]
        BH, Tq, D = q.shape
        Tk, Dv = kt.shape[2], vt.shape[1]
        s = np.empty(Tk, np.float32)
        e = np.empty(Tk, np.float32)
        bits = np.empty(Tk, np.int32)
        two_n = bits.view(np.float32)
        log2e = np.float32(1.4426950408889634)
        ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)
        kmax = np.empty(D, np.float32)
        for h in range(BH):
            for d in range(D):
                a = np.float32(0.0)
                for j in range(Tk):
                    a = max(a, abs(kt[h, d, j]))
                kmax[d] = a
            for i in range(Tq):
                for j in range(Tk):
                    s[j] = 0.0
                m = np.float32(0.0)                      # an upper bound of the row's scores:
                for d in range(D):                       # sum_d |q_d| max_j |k_dj| (no max pass)
                    qd = q[h, i, d]
                    m += abs(qd) * kmax[d]
                    for j in range(Tk):
                        s[j] += qd * kt[h, d, j]
                tot = np.float32(0.0)
                for attempt in range(2):
                    for j in range(Tk):                  # e^(s - m) = 2^n * e^r, vectorized
                        x = max(s[j] - m, np.float32(-87.0))
                        n = np.floor(x * log2e + np.float32(0.5))
                        r = x - n * ln2_hi - n * ln2_lo
                        p = np.float32(1.0 / 5040.0)
                        p = p * r + np.float32(1.0 / 720.0)
                        p = p * r + np.float32(1.0 / 120.0)
                        p = p * r + np.float32(1.0 / 24.0)
                        p = p * r + np.float32(1.0 / 6.0)
                        p = p * r + np.float32(0.5)
                        p = p * r + np.float32(1.0)
                        p = p * r + np.float32(1.0)
                        e[j] = p
                        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
                    tot = np.float32(0.0)
                    for j in range(Tk):
                        w = e[j] * two_n[j]
                        e[j] = w
                        tot += w
                    if tot > np.float32(1e-20):          # the bound was close enough (the usual case)
                        break
                    m = s[0]                             # else the exact max, and once more
                    for j in range(1, Tk):
                        m = max(m, s[j])
                inv = np.float32(1.0) / tot
                for d in range(Dv):
                    a = np.float32(0.0)
                    for j in range(Tk):
                        a += e[j] * vt[h, d, j]
                    out[h, i, d] = a * inv

    _KERNELS = attend_rows
    return _KERNELS


def attend_fused(q, k, v):
    """q [BH, Tq, D], k/v [BH, Tk, D] float32 -> [BH, Tq, Dv] (softmax(q k^T / sqrt D) v), or None without numba."""
    kern = _KERNELS if _KERNELS is not None else _compile()
    if kern is False or q.dtype != np.float32 or k.dtype != np.float32 or v.dtype != np.float32:
        return None
    BH, Tq, D = q.shape
    qs = q * np.float32(1.0 / D ** 0.5)                                   # [BH, Tq, D] (a fresh, contiguous copy)
    kt = np.ascontiguousarray(k.transpose(0, 2, 1))                       # [BH, D, Tk]
    vt = np.ascontiguousarray(v.transpose(0, 2, 1))                       # [BH, Dv, Tk]
    out = np.empty((BH, Tq, v.shape[2]), dtype=np.float32)
    kern(np.ascontiguousarray(qs), kt, vt, out)
    return out
