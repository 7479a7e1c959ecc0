"""Scaled dot-product attention with causal masks, grouped-query heads and sliding windows.

Query i sits at absolute position q_offset + i and key j at position j, so the same call serves
prefill (q_offset = 0, Tq = Tk), decode against a KV-cache view (Tq = 1, q_offset = Tk - 1) and
chunked prefill. GQA: query head h reads key/value head h // (Hq // Hkv), like transformers'
repeat_kv and llama.cpp. Long prefills run in query chunks so the score matrix stays small, and
each chunk multiplies only the keys it can see (the causal cut and a sliding window skip the rest).
"""
from __future__ import annotations

import math

import numpy as np

from ..device import array_module
from .activations import softmax

_MAX_SCORES = 1 << 24          # score elements per chunk (64 MB of float32)


def _keep_mask(xp, q_pos, k_pos, causal, window):
    """bool [tq, tk]: True where the query at q_pos may see the key at k_pos (None: all kept)."""
    if not causal and window is None:
        return None
    if window is None and q_pos.shape[0] == 1 and int(q_pos[0]) >= int(k_pos[-1]):
        return None                                    # one query that sees every key (decode)
    q_pos, k_pos = q_pos[:, None], k_pos[None, :]      # [tq, 1], [1, tk]
    keep = k_pos <= q_pos if causal else xp.ones((q_pos.shape[0], k_pos.shape[1]), dtype=bool)
    if window is not None:
        keep &= (q_pos - k_pos) < int(window)
    return keep


def _key_range(s, tq, Tk, q_offset, causal, window):
    """Keys [lo, hi) that some query of the chunk s..s+tq-1 can see."""
    lo = max(0, q_offset + s - int(window) + 1) if window is not None else 0
    hi = min(Tk, q_offset + s + tq) if causal else Tk
    return lo, max(lo, hi)


def attention(q, k, v, causal=True, q_offset=0, window=None, scale=None, mask=None):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D(v)] -> [Tq, Hq, Dv]; mask broadcastable to [Hq, Tq, Tk]."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all be [T, H, D]")
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    if k.shape[2] != D or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit together")
    if Hq % Hkv:
        raise ValueError(f"attention: {Hq} query heads in q {tuple(q.shape)} are not a multiple of {Hkv} kv heads in k {tuple(k.shape)}")
    if window is not None and int(window) < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q_offset = int(q_offset)
    xp = array_module(q)
    if xp.__name__ == "cupy" and Tq == 1 and mask is None:
        from . import cuda_kernels
        out = cuda_kernels.attention_decode(q, k, v, bool(causal), q_offset, window, scale)
        if out is not None:
            return out
    if xp.__name__ == "numpy" and Tq == 1 and mask is None and q.dtype == k.dtype == v.dtype == np.float32:
        from .decode_attention import attention_one      # decode: one fused pass (numba)
        out = attention_one(q, k, v, scale, *_key_range(0, 1, Tk, q_offset, causal, window))
        if out is not None:
            return out
    G = Hq // Hkv
    out = xp.empty((Tq, Hq, v.shape[2]), dtype=q.dtype)
    fused = xp.__name__ == "numpy" and causal and mask is None and q.dtype == k.dtype == np.float32
    if fused:
        from .masked_softmax import causal_softmax_
    step = max(1, _MAX_SCORES // max(1, Hq * Tk))
    for s in range(0, Tq, step):
        qc = q[s:s + step]                             # [tq, Hq, D]
        tq = qc.shape[0]
        lo, hi = _key_range(s, tq, Tk, q_offset, causal, window)
        tk = hi - lo
        if tk == 0:                                    # no visible key (queries past a windowed cache)
            out[s:s + tq] = 0.0
            continue
        qh = qc.transpose(1, 0, 2).reshape(Hkv, G * tq, D)                # [Hkv, G*tq, D]
        scores = (qh @ k[lo:hi].transpose(1, 2, 0)).reshape(Hq, tq, tk)   # [Hkv, G*tq, tk] -> [Hq, tq, tk]
        if fused:                                      # scale, mask and softmax in one numba pass per row
            p = scores if causal_softmax_(scores, scale, s + q_offset, lo, window) else None
            if p is not None:
                o = p.reshape(Hkv, G * tq, tk) @ v[lo:hi].transpose(1, 0, 2)
                out[s:s + tq] = o.reshape(Hq, tq, -1).transpose(1, 0, 2)
                continue
        scores *= scale
        keep = _keep_mask(xp, xp.arange(s, s + tq) + q_offset, xp.arange(lo, hi), causal, window)  # [tq, tk]
        m = mask
        if m is not None:
            if m.ndim >= 2 and m.shape[-2] == Tq and Tq > 1:
                m = m[..., s:s + tq, :]                # this chunk's query rows
            if m.shape[-1] == Tk and tk != Tk:
                m = m[..., lo:hi]                      # the keys in range
        if keep is not None:
            m = keep if m is None else (keep & m if m.dtype == bool else m + xp.where(keep, 0.0, -math.inf).astype(q.dtype))
        p = softmax(scores, axis=-1, mask=m)           # [Hq, tq, tk]
        o = p.reshape(Hkv, G * tq, tk) @ v[lo:hi].transpose(1, 0, 2)      # [Hkv, G*tq, tk] @ [Hkv, tk, Dv]
        out[s:s + tq] = o.reshape(Hq, tq, -1).transpose(1, 0, 2)         # [tq, Hq, Dv]
    return out
