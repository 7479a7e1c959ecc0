"""Int8 activations (llama.cpp's Q8 blocks): x rounded per 32-value block to int8 and a float16
scale, the numba `quantize_x` the int8 kernels call, its NumPy twin `quantize_q8`, and
`reference`, the NumPy statement of what `qmatvec` computes for each type.

`quantize_x` and `_round_f16` are compiled by the package's `_jit` (numba, inlined into the
kernels); as plain Python they give the same numbers, slowly.
"""
from __future__ import annotations

import math

import numpy as np

from ...quants import INT8_X_TYPES, QuantTensor, quant_matmul


def _round_f16(v):
    """float32 v >= 0 rounded to the nearest float16 (ties to even), as float32: numba has no
    float16, so the significand is rounded to 11 bits (fewer below 2^-14, float16's subnormals)."""
    if v == 0.0:
        return np.float32(0.0)
    m, e = math.frexp(np.float64(v))                                       # v = m 2^e, 0.5 <= m < 1
    if e >= -13:
        r = math.ldexp(np.rint(math.ldexp(m, 11)), e - 11)
    else:
        r = np.rint(np.float64(v) * 16777216.0) / 16777216.0               # steps of 2^-24
    return np.float32(r) if r <= 65504.0 else np.float32(np.inf)


def quantize_x(x):
    """x [n, cols] f32 -> xq int8 [n, cols], dx f32 [n, nb], xqs int32 [n, nb], per 32-value block:
    xq = rint(x * (127 / max|x|)), dx = max|x| / 127 rounded to float16, xqs = sum of the block's
    xq (all zero where max|x| = 0): llama.cpp's Q8_0 activations on x86 (AVX path), so the
    products see the same x as llama.cpp's. The operations of quantize_q8, its NumPy twin."""
    xq, dx, xqs = x_buffers(x)
    for i in range(x.shape[0]):
        quantize_row(x, i, xq, dx, xqs)
    return xq, dx, xqs


def x_buffers(x):
    """The empty (xq, dx, xqs) of `quantize_x` for x [n, cols]."""
    n, cols = x.shape
    return np.empty((n, cols), np.int8), np.empty((n, cols // 32), np.float32), np.empty((n, cols // 32), np.int32)


def quantize_row(x, i, xq, dx, xqs):
    """Row i of `quantize_x`, in place (rows are independent: the GEMMs split them over threads)."""
    for b in range(x.shape[1] // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[i, b * 32 + j]))
        dx[i, b] = _round_f16(amax / np.float32(127.0))
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        t = 0
        for j in range(32):
            q = np.int32(np.rint(x[i, b * 32 + j] * inv))
            xq[i, b * 32 + j] = q
            t += q
        xqs[i, b] = t


INT8_TYPES = INT8_X_TYPES   # their decode dots take x quantized to int8 (quants.INT8_X_TYPES)


def quantize_q8(x):
    """NumPy twin of `quantize_x` (the reference it is tested against): same values, bit for bit."""
    x = np.asarray(x, np.float32)
    n, cols = x.shape
    xb = x.reshape(n, cols // 32, 32)                                      # [n, nb, 32]
    amax = np.max(np.abs(xb), axis=-1)                                     # [n, nb]
    dx = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
    inv = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax > 0)
    xq = np.rint(xb * inv[..., None]).astype(np.int8)                      # [n, nb, 32]
    return xq.reshape(n, cols), dx, xq.astype(np.int32).sum(-1, dtype=np.int32)


def reference(x, qt: QuantTensor):
    """What `qmatvec` computes, in NumPy: for INT8_TYPES, dequant(qt) @ the int8-rounded x (each
    32-block of x as xq * dx, llama.cpp's Q8 activations) in float64; else `quant_matmul`."""
    x2 = np.asarray(x, np.float32).reshape(-1, qt.shape[1])
    if qt.qtype not in INT8_TYPES:
        return quant_matmul(x2, qt, fast=False).reshape(*np.shape(x)[:-1], qt.shape[0])
    from ...quants import dequantize
    xq, dx, _ = quantize_q8(x2)
    xt = (xq.reshape(len(x2), -1, 32) * dx[..., None].astype(np.float64)).reshape(x2.shape)
    w = dequantize(np.asarray(qt.data), qt.qtype).reshape(qt.shape).astype(np.float64)
    return (xt @ w.T).astype(np.float32).reshape(*np.shape(x)[:-1], qt.shape[0])
