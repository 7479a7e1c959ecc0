"""numba fast paths for the UNet's attention: one fused pass per query row, no score matrix.

spark-emoji has 32 heads of dimension 4, so a [heads, T, T] score block is mostly softmax
passes (max, subtract, exp, sum, divide) over memory; here each query row's scores live in a
small buffer: scores, then exp and the sum, then the weighted values, each a vectorized loop.
The stabilising shift is an upper bound of the row's scores, sum_d |q_d| max_j |k_dj|, not
the max (a max reduction does not vectorize in numba: it cost as much as all the rest); if the
bound is so loose that every exp underflows (sum < 1e-20) the row is redone with the true max.
NumPy's exp is SIMD but numba's is a scalar libm call, so exp is `kernels.expf.exp_parts`, a
polynomial LLVM vectorizes: relative error ~2e-7, like float32 itself. `attend` in attention.py
(NumPy: matmul + softmax + matmul) stays the reference and the fallback without numba.

Also here: softmax_rows_ (bigger heads: BLAS makes the scores, this turns them into unnormalised
weights in place, the max in 16 lanes) and rms_rope_into (Flux's qk RMSNorm + RoPE in one pass).
"""
from __future__ import annotations

import numpy as np

from ..kernels.activations import split_rows

_KERNELS = None   # compiled on first use; False when numba is missing
_SOFTMAX = None   # softmax_rows compiled on first use; False without numba
exp_parts = None  # kernels.expf.exp_parts, inlined; set when the kernels compile


def attend_rows(q, kt, vt, out, lo, hi):
    # heads lo..hi-1 of q [BH, Tq, D] (pre-scaled), kt/vt [BH, D, Tk], out [BH, Tq, Dv]
    BH, Tq, D = q.shape
    Tk, Dv = kt.shape[2], vt.shape[1]
    s = np.empty(Tk, np.float32)
    e = np.empty(Tk, np.float32)
    bits = np.empty(Tk, np.int32)
    two_n = bits.view(np.float32)
    kmax = np.empty(D, np.float32)
    for h in range(lo, hi):
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
                    e[j], bits[j] = exp_parts(s[j] - m)          # s - m <= 0: no overflow
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

def attend_rows4(q, kt, vt, out, lo, hi):
    # the same for D = Dv = 4 (spark-emoji), two loops per query row: scores + exp, then the
    # sum and the weighted values together (the generic kernel makes ~11 passes per row)
    BH, Tq, D = q.shape
    Tk = kt.shape[2]
    e = np.empty(Tk, np.float32)
    bits = np.empty(Tk, np.int32)
    two_n = bits.view(np.float32)
    for h in range(lo, hi):
        k0, k1, k2, k3 = kt[h, 0], kt[h, 1], kt[h, 2], kt[h, 3]
        v0, v1, v2, v3 = vt[h, 0], vt[h, 1], vt[h, 2], vt[h, 3]
        km0, km1, km2, km3 = np.abs(k0).max(), np.abs(k1).max(), np.abs(k2).max(), np.abs(k3).max()
        for i in range(Tq):
            q0, q1, q2, q3 = q[h, i, 0], q[h, i, 1], q[h, i, 2], q[h, i, 3]
            m = abs(q0) * km0 + abs(q1) * km1 + abs(q2) * km2 + abs(q3) * km3   # >= every score
            for attempt in range(2):
                for j in range(Tk):
                    e[j], bits[j] = exp_parts(q0 * k0[j] + q1 * k1[j] + q2 * k2[j] + q3 * k3[j] - m)
                tot = a0 = a1 = a2 = a3 = np.float32(0.0)
                for j in range(Tk):
                    w = e[j] * two_n[j]
                    tot += w
                    a0 += w * v0[j]
                    a1 += w * v1[j]
                    a2 += w * v2[j]
                    a3 += w * v3[j]
                if tot > np.float32(1e-20):
                    break
                m = np.float32(-np.inf)              # the bound was too loose: the true max
                for j in range(Tk):
                    m = max(m, q0 * k0[j] + q1 * k1[j] + q2 * k2[j] + q3 * k3[j])
            inv = np.float32(1.0) / tot
            out[h, i, 0], out[h, i, 1], out[h, i, 2], out[h, i, 3] = a0 * inv, a1 * inv, a2 * inv, a3 * inv


def softmax_rows(s, scale, inv, lo, hi):
    # rows lo..hi-1 of s [R, n] raw scores -> e^(scale (s - row max)) in place, inv[r] = 1 / row sum.
    # Four short loops per row, run from L1 and vectorized: the max in 16 lanes (a plain running
    # max does not vectorize: 4x slower), e^r with its 2^k bits (expf), then the product and the sum.
    n = s.shape[1]
    bits = np.empty(n, np.int32)
    two_k = bits.view(np.float32)
    lanes = np.empty(16, np.float32)
    n16 = n - n % 16
    for r in range(lo, hi):
        row = s[r]
        m = row[0]
        if n16:
            for i in range(16):
                lanes[i] = row[i]
            for j0 in range(16, n16, 16):
                for i in range(16):
                    x = row[j0 + i]
                    lanes[i] = x if x > lanes[i] else lanes[i]
            for i in range(16):
                m = max(m, lanes[i])
        for j in range(n16, n):
            m = max(m, row[j])
        m *= scale
        for j in range(n):
            row[j], bits[j] = exp_parts(row[j] * scale - m)
        tot = np.float32(0.0)
        for j in range(n):
            e = row[j] * two_k[j]
            row[j] = e
            tot += e
        inv[r] = np.float32(1.0) / tot


def _compile_softmax():
    global _SOFTMAX
    from ..kernels.expf import njit_with_exp
    _SOFTMAX = njit_with_exp(softmax_rows)
    return _SOFTMAX


def softmax_ready() -> bool:
    """True when softmax_rows_ has its numba kernel (compiled or loaded here on first call)."""
    return (_SOFTMAX if _SOFTMAX is not None else _compile_softmax()) is not False


def softmax_rows_(s, scale: float):
    """s [R, n] float32 C-contiguous raw scores -> (s = e^(scale (s - row max)) in place, inv [R] =
    1 / row sums); None without numba. The caller multiplies its `s @ v` rows by inv: one pass over
    [R, Dv] instead of a normalising pass over [R, n]."""
    kern = _SOFTMAX if _SOFTMAX is not None else _compile_softmax()
    if kern is False:
        return None
    inv = np.empty(s.shape[0], np.float32)
    kern(s, np.float32(scale), inv, 0, s.shape[0])
    return inv


def _compile():
    global _KERNELS
    from ..kernels.expf import njit_with_exp
    rows = njit_with_exp(attend_rows, error_model="numpy")
    _KERNELS = rows and (rows, njit_with_exp(attend_rows4, error_model="numpy"))
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
    split_rows(kern[1 if D == v.shape[2] == 4 else 0], BH, np.ascontiguousarray(qs), kt, vt, out,
               work=BH * Tq * kt.shape[2] * D // 4)                   # heads on row_threads()
    return out


# ---------------------------------------------------------------------------- Flux: qk RMSNorm + RoPE

_RMS_ROPE = None   # compiled on first use; False without numba


def _compile_rms_rope():
    global _RMS_ROPE
    try:
        import numba
    except ImportError:
        _RMS_ROPE = False
        return _RMS_ROPE
    _RMS_ROPE = numba.njit(cache=True, nogil=True, error_model="numpy")(rms_rope_rows)
    return _RMS_ROPE


def rms_rope_rows(x, w, cos, sin, eps, t0, out):
    # x [B, T, H, D] -> out[:, t0:t0+T] ([B, Ttot, H, D]): each head's vector RMS-normed (times w [D]),
    # then its pairs (2j, 2j+1) turned by cos/sin[t0 + t, j] ([Ttot, D/2])
    B, T, H, D = x.shape
    for b in range(B):
        for t in range(T):
            c, s = cos[t0 + t], sin[t0 + t]
            for h in range(H):
                v, o = x[b, t, h], out[b, t0 + t, h]
                ss = np.float32(0.0)
                for d in range(D):
                    ss += v[d] * v[d]
                r = np.float32(np.sqrt(ss * np.float32(1.0 / D) + eps))
                for j in range(D // 2):
                    a0, a1 = v[2 * j] / r * w[2 * j], v[2 * j + 1] / r * w[2 * j + 1]
                    o[2 * j] = a0 * c[j] - a1 * s[j]
                    o[2 * j + 1] = a1 * c[j] + a0 * s[j]


def rms_rope_into(x, w, cos, sin, eps: float, t0: int, out) -> bool:
    """Flux's per-head qk RMSNorm then RoPE of x [B, T, H, D] written into out[:, t0:t0+T]
    ([B, Ttot, H, D], float32, C-contiguous); False (nothing written) without numba."""
    kern = _RMS_ROPE if _RMS_ROPE is not None else _compile_rms_rope()
    if kern is False:
        return False
    kern(np.ascontiguousarray(x), np.ascontiguousarray(w, dtype=np.float32), cos, sin, np.float32(eps), int(t0), out)
    return True
