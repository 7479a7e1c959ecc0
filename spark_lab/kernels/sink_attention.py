"""Attention with sinks (gpt-oss): one learned logit per query head joins the softmax denominator.

    p[h, i, j] = exp(s[h, i, j]) / (sum_j' exp(s[h, i, j']) + exp(sink[h]))

The sink takes no value: it only lets a head attend to "nothing". Same conventions as
`attention()` (query i at absolute position q_offset + i, keys at 0..Tk-1, GQA, sliding
`window`); one NumPy/CuPy body in query chunks (the reference); one decode query on the CPU
goes through `decode_attention`'s kernel, which takes the sinks too.
"""
from __future__ import annotations

import math

import numpy as np

from ..device import array_module

_MAX_SCORES = 1 << 24          # score elements per chunk (64 MB of float32)


def attention_sinks(q, k, v, sinks, q_offset=0, window=None, scale=None):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D], sinks [Hq] -> [Tq, Hq, Dv] (causal)."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"attention_sinks: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    if Hq % Hkv or sinks.shape != (Hq,):
        raise ValueError(f"attention_sinks: {Hq} query heads, {Hkv} kv heads and sinks {tuple(sinks.shape)} do not fit together")
    xp = array_module(q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q_offset = int(q_offset)
    if xp is np and Tq == 1 and q.dtype == k.dtype == v.dtype == np.float32:
        lo = max(0, q_offset - int(window) + 1) if window is not None else 0
        out = np.empty((1, Hq, v.shape[2]), np.float32)
        if attention_sinks_into(np.ascontiguousarray(q[0]), k, v, sinks, scale, lo, min(Tk, q_offset + 1), out[0]):
            return out
    G = Hq // Hkv
    sk = sinks.astype(xp.float32)[:, None, None]                       # [Hq, 1, 1]
    out = xp.empty((Tq, Hq, v.shape[2]), dtype=xp.float32)
    step = max(1, _MAX_SCORES // max(1, Hq * Tk))
    for s in range(0, Tq, step):
        qc = q[s:s + step]                                             # [tq, Hq, D]
        tq = qc.shape[0]
        lo = max(0, q_offset + s - int(window) + 1) if window is not None else 0
        hi = min(Tk, q_offset + s + tq)
        qh = qc.transpose(1, 0, 2).reshape(Hkv, G * tq, D)                                    # [Hkv, G*tq, D]
        scores = (qh @ k[lo:hi].transpose(1, 2, 0)).reshape(Hq, tq, hi - lo) * np.float32(scale)  # [Hq, tq, tk]
        qp = xp.arange(s, s + tq)[:, None] + q_offset                 # [tq, 1]
        kp = xp.arange(lo, hi)[None, :]                               # [1, tk]
        keep = kp <= qp
        if window is not None:
            keep &= (qp - kp) < int(window)
        scores = xp.where(keep[None], scores, np.float32(-np.inf))
        m = xp.maximum(scores.max(axis=-1, keepdims=True), sk)        # [Hq, tq, 1]
        e = xp.exp(scores - m)
        p = e / (e.sum(axis=-1, keepdims=True) + xp.exp(sk - m))      # [Hq, tq, tk]
        o = p.reshape(Hkv, G * tq, hi - lo) @ v[lo:hi].transpose(1, 0, 2)   # [Hkv, G*tq, Dv]
        out[s:s + tq] = o.reshape(Hq, tq, -1).transpose(1, 0, 2)
    return out


def attention_sinks_into(q, k, v, sinks, scale: float, lo: int, hi: int, out) -> bool:
    """q [Hq, D], k/v [Tk, Hkv, D] (keys lo..hi-1 visible), sinks [Hq] -> out [Hq, Dv] in place:
    the decode kernel (`decode_attention`) with the sinks in its softmax. False (out untouched)
    when numba is unavailable."""
    from .decode_attention import attention_into
    return attention_into(q, k, v, scale, lo, hi, out, sinks=sinks)
