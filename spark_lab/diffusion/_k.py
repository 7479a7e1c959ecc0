"""TEMPORARY: the kernels this package uses, taken from spark_lab.kernels where they exist.

Fallbacks below stand in only while spark_lab/kernels/ is being written; they go away once
every name imports from there.
"""
from __future__ import annotations

import math

import numpy as np

from ..device import array_module

try:
    from ..kernels import (attention, conv2d, geglu, gelu, group_norm, layernorm, linear, silu,  # noqa: F401
                           softmax, timestep_embedding, upsample_nearest2d)
except ImportError:
    from ..kernels.activations import geglu, gelu, silu, softmax  # noqa: F401
    from ..kernels.linalg import linear  # noqa: F401
    from ..kernels.norms import group_norm, layernorm  # noqa: F401

    def conv2d(x, w, b=None, stride=1, padding=0, groups=1):
        N, C, H, W = x.shape
        O, Cg, kh, kw = w.shape
        if padding:
            x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        Ho = (x.shape[2] - kh) // stride + 1
        Wo = (x.shape[3] - kw) // stride + 1
        cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
        cols = cols[:, :, :Ho, :Wo]                              # [N, C, Ho, Wo, kh, kw]
        y = np.einsum("nchwij,ocij->nohw", cols, w, optimize=True)
        if b is not None:
            y = y + b[None, :, None, None]
        return np.ascontiguousarray(y, dtype=np.float32)

    def upsample_nearest2d(x, scale=2):
        return x.repeat(scale, axis=2).repeat(scale, axis=3)

    def timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0, max_period=10000):
        half = dim // 2
        exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - downscale_freq_shift)
        freqs = np.exp(exponent).astype(np.float32)
        args = np.asarray(t, dtype=np.float32)[:, None] * freqs[None]
        args = scale * args
        emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
        if flip_sin_to_cos:
            emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
        if dim % 2:
            emb = np.pad(emb, ((0, 0), (0, 1)))
        return emb.astype(np.float32)

    def attention(q, k, v, causal=True, q_offset=0, window=None, scale=None, mask=None):
        D = q.shape[-1]
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        s = np.einsum("qhd,khd->hqk", q, k) * scale
        p = softmax(s, axis=-1, mask=mask)
        return np.einsum("hqk,khd->qhd", p, v).astype(np.float32)
