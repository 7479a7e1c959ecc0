"""Matrix products and table look-ups: linear, matmul, embedding.

Weights follow torch's layout: a linear weight is [out, in], so `linear(x, w) = x @ w.T`.
A weight may also be a `spark_lab.quants.QuantTensor` (raw GGML blocks); then the product
goes through the quantized path and the float32 weight is never materialised whole: a fused
mat-vec for a few rows (CUDA kernel on CuPy, `kernels.qmatvec` on NumPy), else
`quants.quant_matmul` (chunked dequantize + GEMM).
"""
from __future__ import annotations

import numpy as np

from ..device import array_module
from ..quants import INT8_X_TYPES   # the types whose CPU kernels round x to int8: the GPU does too

# decode-sized inputs (a handful of rows) take the quantized mat-vec (CUDA, or numba on the CPU);
# more rows go to quant_matmul (numba tiles + BLAS on the CPU). CPU crossover, one SmolLM2 layer
# on one thread: the mat-vec wins up to 11-12 rows for Q8_0 and ~14 for Q4_1, by <= 20% from 9
# rows on; kept at 8 because the CUDA mat-vec shares it and was not measured at more rows
_QMATVEC_MAX_ROWS = 8


def round_x_q8(x):
    """x [n, cols] f32 (cols % 32 == 0) -> the int8-rounded x as floats, xq * dx, per 32-block:
    dx = max|x| / 127 rounded to float16, xq = rint(x * 127 / max|x|). Written against the array
    module, so CuPy gets bit for bit what `kernels.qmatvec.quantize_x` gives the CPU kernels."""
    xp = array_module(x)
    n, cols = x.shape
    xb = x.reshape(n, cols // 32, 32)                                      # [n, nb, 32]
    amax = xp.max(xp.abs(xb), axis=-1)                                     # [n, nb]
    dx = (amax / np.float32(127.0)).astype(xp.float16).astype(xp.float32)
    inv = xp.where(amax > 0, np.float32(127.0) / xp.where(amax > 0, amax, np.float32(1.0)), np.float32(0.0))
    xq = xp.rint(xb * inv[..., None])                                      # [n, nb, 32], integers in -127..127
    return (xq * dx[..., None]).reshape(n, cols)


def _is_quant(w) -> bool:
    return hasattr(w, "qtype")                    # a QuantTensor; arrays have no qtype


def linear(x, w, b=None):
    """x [..., in] @ w[out, in].T (+ b[out]) -> [..., out]; w float or QuantTensor."""
    if _is_quant(w):
        return _quant_linear(x, w, b)
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(w.shape)} (want [..., in] and [out, in])")
    y = x @ w.T                                   # [..., in] @ [in, out] -> [..., out]
    if b is not None:
        if b.shape != (w.shape[0],):
            raise ValueError(f"linear: bias {tuple(b.shape)} does not match weight {tuple(w.shape)}")
        y += b
    return y


def _quant_linear(x, w, b):
    rows, cols = w.shape
    if x.shape[-1] != cols:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match quantized weight {tuple(w.shape)} (want [..., in] and [out, in])")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)                      # [n, in]
    y = None
    if array_module(x2) is not np and w.qtype in INT8_X_TYPES and cols % 32 == 0:
        x2 = round_x_q8(x2.astype(np.float32, copy=False))   # the numbers the CPU kernels use
    if x2.shape[0] <= _QMATVEC_MAX_ROWS:             # decode: a fused dequantize + dot, no f32 weight
        if array_module(x2) is not np:
            from . import cuda_kernels
            if cuda_kernels.supports_qtype(w.qtype):
                y = cuda_kernels.qmatvec(x2, w.data, int(w.qtype), rows, cols)   # [n, out]
        else:
            try:
                from .qmatvec import qmatvec      # numba CPU kernels (falls back to quant_matmul itself)
            except ImportError:
                qmatvec = None
            if qmatvec is not None:
                y = qmatvec(x2, w)                # float32 dots, within ~1e-6 of quant_matmul
    if y is None:
        from ..quants import quant_matmul     # lazy: quants imports kernels' neighbours
        y = quant_matmul(x2, w)                   # [n, in] -> [n, out]
    if b is not None:
        if b.shape != (rows,):
            raise ValueError(f"linear: bias {tuple(b.shape)} does not match weight {tuple(w.shape)}")
        y += b
    return y.reshape(*lead, rows)


def matmul(a, b):
    """[..., m, k] @ [..., k, n] -> [..., m, n] (batch dims broadcast)."""
    if a.ndim < 1 or b.ndim < 1 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul: a {tuple(a.shape)} and b {tuple(b.shape)} do not share the inner dimension")
    return a @ b


def embedding(table, ids):
    """table [vocab, d] (float or QuantTensor), ids [n] int -> rows [n, d] float32."""
    xp = array_module(ids)
    ids = xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    vocab = table.shape[0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"embedding: token id out of range [0, {vocab}) for table {tuple(table.shape)}: "
                         f"min {int(ids.min())}, max {int(ids.max())}")
    if _is_quant(table):
        return table.rows(ids)                    # [n, d], dequantized row by row
    return table[ids].astype(np.float32, copy=False)   # [n, d]
