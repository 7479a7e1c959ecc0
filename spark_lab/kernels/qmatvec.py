"""Quantized mat-vec for decode on the CPU: fused dequantize + dot in numba.

    y = qmatvec(x, qt)     # x [in] or [n, in] f32 (n small), qt QuantTensor [out, in] -> [out] / [n, out]

Why a repack. A decode step reads every weight once, so the mat-vec is a race through memory,
and NumPy's dequantize-then-BLAS pays for a float32 copy of each weight. The fused kernel
never writes that copy. `prepare(qt)` repacks the GGML blocks once at load time into a
row-interleaved layout: G output rows side by side, so byte j of a block is a vector of G
bytes, one per row. The inner loop then runs across rows (SIMD lanes) instead of along a
row, which needs no horizontal sum and no float reassociation: the kernels compile with
fastmath=False and every row's sum is taken in a fixed order.

    nibble types (Q4_0, Q4_1, Q4_K): qs u8 [ng, nb, 16, G], d, m f32 [ng, nb, G]
        value = d * q + m per 32-value block (Q4_0: m = -8 d; Q4_K: one block per sub-block)
    Q5_0: qs u8 [ng, nb, 16, G], qh u8 [ng, nb, 4, G] (bit j = high bit of value j), d [ng, nb, G]
    Q8_0: qs i8 [ng, nb, 32, G], d [ng, nb, G]
    Q6_K: qs u8 [ng, nb, 16, G] low nibbles, qh u8 [ng, nb, 8, G] 2-bit highs, s f32 [ng, nb, 2, G]
        (one scale per 16 values: values 0..15 and 16..31 of each 32-block)

Byte j of a 32-value block holds value j in its low nibble and value j + 16 in its high one
(the Q4_0/Q4_1 order; Q4_K and Q6_K are reordered to it). Scales become float32 next to
the codes, so the repacked weight is 1.0-1.33x the raw blocks (see `Packed.nbytes`).

Two kernels per nibble type:
  exact=True   float32 codes times float32 x (matches quant_matmul to ~1e-6 relative)
  exact=False  x quantized once per call to int8 per 32 values (llama.cpp's Q8_1 idea) and
               int16 dot products; ~5e-3 of max|y| off the float result, and faster.
Q5_0, Q6_K and Q8_0 always take the float kernel.

numba is optional and imported on first use; without it (or for CuPy arrays, other quant
types or large batches) qmatvec falls back to `quants.quant_matmul`. Kernels are compiled
with cache=True, so only the first process on a machine pays the compile time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..device import array_module
from ..quants import BLOCK_SIZES, QuantTensor, _k_scale_min, quant_matmul

MAX_BATCH = 16        # above this many rows of x, dequantize-then-BLAS wins
FAST_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q8_0, QT.Q6_K)

prange = range        # replaced by numba.prange when the kernels are compiled
_JIT = None           # {name: compiled kernel} once numba is loaded; False if it is missing


# ---------------------------------------------------------------------------- kernels (numba source)
# Shapes: ng groups of G rows, nb 32-value blocks per row, n rows of x; out f32 [n, ng * G].

def _k_nib_f(qs, d, m, x, xs, out):
    """Nibble types, float: qs u8 [ng, nb, 16, G]; d, m [ng, nb, G]; x [n, nb*32]; xs [n, nb] block sums."""
    ng, nb, _, G = qs.shape
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                q, xb, db, mb, sb = qs[g, b], x[i, b * 32:b * 32 + 32], d[g, b], m[g, b], xs[i, b]
                for l in range(G):
                    t = np.float32(0.0)
                    for j in range(16):
                        v = q[j, l]
                        t += np.float32(np.uint8(v & 15)) * xb[j] + np.float32(np.uint8(v >> 4)) * xb[16 + j]
                    acc[l] += db[l] * t + mb[l] * sb
            out[i, g * G:(g + 1) * G] = acc


def _k_nib_i(qs, d, m, xq, xd, xqs, xs, out):
    """Nibble types, int8 activations: xq i8 [n, nb*32], xd scale [n, nb], xqs sum of xq [n, nb], xs [n, nb].

    sum_j (d q_j + m) x_j ~= d xd sum_j (q_j - 8) xq_j + (m + 8 d) sum_j x_j; each 16-product
    half-sum of q_j xq_j (<= 16 * 15 * 127 = 30480) fits int16, so the products run 16 to a vector.
    """
    ng, nb, _, G = qs.shape
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(xq.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                q, xb, db, mb = qs[g, b], xq[i, b * 32:b * 32 + 32], d[g, b], m[g, b]
                dx, c8, sb = xd[i, b], np.int32(8 * xqs[i, b]), xs[i, b]
                for l in range(G):
                    s0 = np.int16(0)
                    s1 = np.int16(0)
                    for j in range(16):
                        v = q[j, l]
                        s0 = np.int16(s0 + np.int16(np.uint8(v & 15)) * np.int16(xb[j]))
                        s1 = np.int16(s1 + np.int16(np.uint8(v >> 4)) * np.int16(xb[16 + j]))
                    s = np.int32(np.int32(s0) + np.int32(s1) - c8)
                    acc[l] += (db[l] * dx) * np.float32(s) + (mb[l] + np.float32(8.0) * db[l]) * sb
            out[i, g * G:(g + 1) * G] = acc


def _k_q5_0(qs, qh, d, x, xs, out):
    """Q5_0, float: value = d * (q - 16), q = low nibble | high bit << 4."""
    ng, nb, _, G = qs.shape
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                q, h, xb, db, sb = qs[g, b], qh[g, b], x[i, b * 32:b * 32 + 32], d[g, b], xs[i, b]
                for l in range(G):
                    t = np.float32(0.0)
                    for j in range(16):
                        v = q[j, l]
                        lo = np.uint8((v & 15) | (((h[j >> 3, l] >> (j & 7)) & 1) << 4))
                        hi = np.uint8((v >> 4) | (((h[2 + (j >> 3), l] >> (j & 7)) & 1) << 4))
                        t += np.float32(lo) * xb[j] + np.float32(hi) * xb[16 + j]
                    acc[l] += db[l] * (t - np.float32(16.0) * sb)
            out[i, g * G:(g + 1) * G] = acc


def _k_q8_0(qs, d, x, out):
    """Q8_0, float: qs i8 [ng, nb, 32, G]."""
    ng, nb, _, G = qs.shape
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                q, xb, db = qs[g, b], x[i, b * 32:b * 32 + 32], d[g, b]
                for l in range(G):
                    t = np.float32(0.0)
                    for j in range(32):
                        t += np.float32(q[j, l]) * xb[j]
                    acc[l] += db[l] * t
            out[i, g * G:(g + 1) * G] = acc


def _k_q6_k(qs, qh, s, x, xs16, out):
    """Q6_K, float: value = s * (q - 32), q = nibble | 2 high bits << 4; xs16 [n, nb, 2] half-block sums."""
    ng, nb, _, G = qs.shape
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                q, h, sc, xb = qs[g, b], qh[g, b], s[g, b], x[i, b * 32:b * 32 + 32]
                s0, s1 = xs16[i, b, 0], xs16[i, b, 1]
                for l in range(G):
                    t0 = np.float32(0.0)
                    t1 = np.float32(0.0)
                    for j in range(16):
                        v = q[j, l]
                        hb = h[j & 7, l]
                        c0 = np.uint8((v & 15) | (((hb >> (2 * (j >> 3))) & 3) << 4))
                        c1 = np.uint8((v >> 4) | (((hb >> (4 + 2 * (j >> 3))) & 3) << 4))
                        t0 += np.float32(c0) * xb[j]
                        t1 += np.float32(c1) * xb[16 + j]
                    acc[l] += sc[0, l] * (t0 - np.float32(32.0) * s0) + sc[1, l] * (t1 - np.float32(32.0) * s1)
            out[i, g * G:(g + 1) * G] = acc


def _k_quantize_x(x, xq, xd, xqs, xs):
    """x f32 [n, nb*32] -> int8 per 32 values: xq, scale xd = max|x| / 127, sum of xq, sum of x."""
    for i in range(x.shape[0]):
        for b in range(xd.shape[1]):
            xb = x[i, b * 32:b * 32 + 32]
            amax = np.float32(0.0)
            s = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(xb[j]))
                s += xb[j]
            dx = amax / np.float32(127.0)
            inv = np.float32(1.0) / dx if dx > 0 else np.float32(0.0)
            qsum = 0
            for j in range(32):
                v = np.int8(np.rint(xb[j] * inv))
                xq[i, b * 32 + j] = v
                qsum += v
            xd[i, b] = dx
            xqs[i, b] = qsum
            xs[i, b] = s


_SOURCES = {"nib_f": _k_nib_f, "nib_i": _k_nib_i, "q5_0": _k_q5_0, "q8_0": _k_q8_0, "q6_k": _k_q6_k}


def _jit():
    """Compile (or load from numba's cache) the kernels on first use; None without numba."""
    global _JIT, prange
    if _JIT is None:
        try:
            import numba
        except ImportError:
            _JIT = False
            return None
        prange = numba.prange
        opts = dict(parallel=True, fastmath=False, cache=True, nogil=True)
        _JIT = {name: numba.njit(**opts)(f) for name, f in _SOURCES.items()}
        _JIT["quantize_x"] = numba.njit(fastmath=False, cache=True, nogil=True)(_k_quantize_x)
    return _JIT or None


def available() -> bool:
    """True when numba is importable (the fused kernels can run)."""
    return _jit() is not None


# ---------------------------------------------------------------------------- repack

@dataclass
class Packed:
    """A QuantTensor repacked for the kernels: `arrays` in the kernel's argument order."""
    kind: str          # "nib", "q5_0", "q8_0" or "q6_k"
    rows: int          # real output rows (the last group may be padded with zero rows)
    cols: int
    G: int             # rows per group (SIMD lanes)
    arrays: tuple

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


def _f16(b):
    """uint8 [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _lanes(a, G):
    """[rows_padded, nb, ...] -> [ng, nb, ..., G]: G consecutive rows become the last axis."""
    ng = a.shape[0] // G
    a = a.reshape(ng, G, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _pair_nibbles(codes):
    """codes u8 [..., 32] in 0..15 -> [..., 16]: byte j = code j | code j+16 << 4."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _unpack_q4_k(blocks):
    """blocks u8 [rows, ns, 144] -> codes [rows, ns*8, 32], d [rows, ns*8], m [rows, ns*8]."""
    rows, ns, _ = blocks.shape
    b = blocks.reshape(rows * ns, 144)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16], np)
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    codes = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(rows, ns * 8, 32)
    d32 = (d[:, None] * sc.astype(np.float32)).reshape(rows, ns * 8)
    m32 = -(dmin[:, None] * mn.astype(np.float32)).reshape(rows, ns * 8)
    return codes, d32, m32


def _unpack_q6_k(blocks):
    """blocks u8 [rows, ns, 210] -> codes 0..63 [rows, ns*8, 32], scales d*sc [rows, ns*8, 2]."""
    rows, ns, _ = blocks.shape
    b = blocks.reshape(rows * ns, 210)
    ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210])
    lo = np.concatenate([ql.reshape(-1, 2, 1, 64) & 15, ql.reshape(-1, 2, 1, 64) >> 4], axis=2).reshape(-1, 8, 32)
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    codes = (lo | (hi.reshape(-1, 8, 32) << 4)).reshape(rows, ns * 8, 32)
    s = (d[:, None] * sc.view(np.int8).astype(np.float32)).reshape(rows, ns * 8, 2)
    return codes, s


def _choose_group(rows: int) -> int:
    return 64 if rows >= 1024 else 32


def prepare(qt: QuantTensor, G: int | None = None) -> Packed | None:
    """Repack `qt` for the fused kernels once (stored on qt.packed); None for types they lack."""
    if qt.packed is not None and (G is None or qt.packed.G == G):
        return qt.packed
    if qt.qtype not in FAST_TYPES or array_module(qt.data) is not np:
        return None
    rows, cols = qt.shape
    G = G or _choose_group(rows)
    bs, ts = BLOCK_SIZES[qt.qtype]
    pad = -rows % G
    blocks = np.asarray(qt.data).reshape(rows, cols // bs, ts)
    if pad:
        blocks = np.concatenate([blocks, np.zeros((pad, *blocks.shape[1:]), np.uint8)])
    q = qt.qtype
    if q in (QT.Q4_0, QT.Q4_1):
        off = 2 if q == QT.Q4_0 else 4
        d = _f16(blocks[..., 0:2])
        m = -8.0 * d if q == QT.Q4_0 else _f16(blocks[..., 2:4])
        arrays, kind = (_lanes(blocks[..., off:], G), _lanes(d, G), _lanes(m.astype(np.float32), G)), "nib"
    elif q == QT.Q4_K:
        codes, d, m = _unpack_q4_k(blocks)
        arrays, kind = (_lanes(_pair_nibbles(codes), G), _lanes(d, G), _lanes(m, G)), "nib"
    elif q == QT.Q5_0:
        arrays, kind = (_lanes(blocks[..., 6:], G), _lanes(blocks[..., 2:6], G), _lanes(_f16(blocks[..., 0:2]), G)), "q5_0"
    elif q == QT.Q8_0:
        arrays, kind = (_lanes(blocks[..., 2:].view(np.int8), G), _lanes(_f16(blocks[..., 0:2]), G)), "q8_0"
    else:  # Q6_K
        codes, s = _unpack_q6_k(blocks)
        hi = codes >> 4                                                    # [rows, nb, 32] in 0..3
        qh = (hi[..., 0:8] | (hi[..., 8:16] << 2) | (hi[..., 16:24] << 4) | (hi[..., 24:32] << 6)).astype(np.uint8)
        arrays, kind = (_lanes(_pair_nibbles(codes & 15), G), _lanes(qh, G), _lanes(s, G)), "q6_k"
    qt.packed = Packed(kind, rows, cols, G, arrays)
    return qt.packed


# ---------------------------------------------------------------------------- entry point

def qmatvec(x, qt: QuantTensor, out=None, exact: bool = False):
    """x @ dequant(qt).T for decode: x [in] or [n, in] f32 -> [out] or [n, out] f32.

    out: optional preallocated float32 result (C-contiguous, the result's shape).
    exact: float32 dot products for every type; default False uses int8 activations for the
           4-bit types (llama.cpp's trade: ~5e-3 of max|y|, faster).
    """
    rows, cols = qt.shape
    x = np.asarray(x, dtype=np.float32) if array_module(x) is np else x
    if x.ndim not in (1, 2) or x.shape[-1] != cols:
        raise ValueError(f"qmatvec: x of shape {tuple(x.shape)} does not match weight shape {qt.shape} (needs [..., {cols}])")
    want = (rows,) if x.ndim == 1 else (x.shape[0], rows)
    if out is not None and (tuple(out.shape) != want or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"qmatvec: out must be float32 C-contiguous of shape {want}, got {out.dtype} {tuple(out.shape)}")
    x2 = np.ascontiguousarray(x.reshape(-1, cols)) if array_module(x) is np else x
    k = _jit() if (array_module(x2) is np and x2.shape[0] <= MAX_BATCH) else None
    p = prepare(qt) if k else None
    if p is None:                                                          # fallback: chunked dequantize + BLAS
        y = quant_matmul(x2, qt)
        if out is None:
            return y.reshape(want)
        out[...] = y.reshape(want)
        return out
    n = x2.shape[0]
    padded = p.arrays[0].shape[0] * p.G                                     # rows rounded up to whole groups
    direct = out is not None and padded == rows                           # the kernel writes straight into out
    full = out.reshape(n, rows) if direct else np.empty((n, padded), np.float32)
    _run(k, p, x2, full, exact)
    if direct:
        return out
    y = np.ascontiguousarray(full[:, :rows]).reshape(want)
    if out is None:
        return y
    out[...] = y
    return out


def _run(k, p: Packed, x, full, exact: bool):
    """Call the kernel for p.kind: x f32 [n, cols] -> full f32 [n, ng * G]."""
    n, nb = x.shape[0], p.cols // 32
    if p.kind == "q8_0":
        k["q8_0"](*p.arrays, x, full)
    elif p.kind == "q6_k":
        xs16 = x.reshape(n, nb, 2, 16).sum(axis=-1, dtype=np.float32)     # [n, nb, 2]
        k["q6_k"](*p.arrays, x, xs16, full)
    elif p.kind == "q5_0":
        xs = x.reshape(n, nb, 32).sum(axis=-1, dtype=np.float32)           # [n, nb]
        k["q5_0"](*p.arrays, x, xs, full)
    elif exact:
        xs = x.reshape(n, nb, 32).sum(axis=-1, dtype=np.float32)
        k["nib_f"](*p.arrays, x, xs, full)
    else:
        xq = np.empty((n, nb * 32), np.int8)
        xd, xqs, xs = np.empty((n, nb), np.float32), np.empty((n, nb), np.int32), np.empty((n, nb), np.float32)
        k["quantize_x"](x, xq, xd, xqs, xs)
        k["nib_i"](*p.arrays, xq, xd, xqs, xs, full)
