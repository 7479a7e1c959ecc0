"""Scaled, causally masked softmax of attention scores in place, on the CPU in numba.

`attention()` on NumPy computes scores with BLAS, then needs scale, the causal/sliding mask,
max, exp, sum and normalise: as array operations that is half a dozen passes over a
[heads, queries, keys] tensor (a quarter of a long prompt's time), here it is one loop per row
that touches only the visible keys and leaves the others at zero.

    causal_softmax_(scores, scale, q0, k0, window)
        scores [H, tq, tk] f32, raw q.k products; query row r sits at position q0 + r, key
        column j at k0 + j; visible: k0 + j <= q0 + r and (window == 0 or q0 + r - (k0 + j) < window).
        -> scores = softmax over the visible keys of scale * scores, 0 elsewhere; rows with no
        visible key are all zero (as `softmax` with a mask gives).

Same numbers as the NumPy path to ~2e-7 (exp is `expf.exp_parts`, a vectorized polynomial). A row
of NaN scores (weights read from a damaged file) comes out NaN, as in NumPy: numba's "numpy" error
model, not a ZeroDivisionError.
"""
from __future__ import annotations

import numpy as np

_KERNEL = None            # compiled on first use; False when numba is missing
exp_parts = None          # expf.exp_parts, inlined; set by _compile()


def _causal_softmax(scores, scale, q0, k0, window):
    H, tq, tk = scores.shape
    p = np.empty(tk, np.float32)                     # e^(s - max) of one row, before its 2^n factor
    bits = np.empty(tk, np.int32)                    # the 2^n factors, as float32 bits
    two = bits.view(np.float32)
    for h in range(H):
        for r in range(tq):
            hi = max(0, min(tk, q0 + r - k0 + 1))    # visible keys lo .. hi-1
            lo = min(hi, max(0, q0 + r - window + 1 - k0)) if window > 0 else 0
            m = np.float32(-np.inf)
            for j in range(lo, hi):
                m = max(m, scores[h, r, j])
            m *= scale
            for j in range(lo, hi):
                p[j], bits[j] = exp_parts(scores[h, r, j] * scale - m)
            tot = np.float32(0.0)
            for j in range(lo, hi):
                e = p[j] * two[j]
                p[j] = e
                tot += e
            inv = np.float32(1.0) / tot if hi > lo else np.float32(0.0)
            for j in range(lo):
                scores[h, r, j] = 0.0
            for j in range(lo, hi):
                scores[h, r, j] = p[j] * inv
            for j in range(hi, tk):
                scores[h, r, j] = 0.0


def _compile():
    global _KERNEL
    from .expf import njit_with_exp
    _KERNEL = njit_with_exp(_causal_softmax)
    return _KERNEL


def causal_softmax_(scores, scale: float, q0: int, k0: int, window: int | None) -> bool:
    """In place (see the module doc); False (scores untouched) when numba is unavailable."""
    kern = _KERNEL if _KERNEL is not None else _compile()
    if kern is False:
        return False
    kern(scores, np.float32(scale), int(q0), int(k0), int(window or 0))
    return True
