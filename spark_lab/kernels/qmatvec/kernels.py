"""The numba sources of the quantized kernels: fused mat-vecs (decode) and tile dequantizers
(prefill), over the row-interleaved arrays of `repack.py`, built from the block intrinsics of
`simd.py`. The package's `_jit` compiles them (it first sets this module's `prange`, the
intrinsics and the jitted helpers below as globals: numba resolves globals when it compiles).
numba's on-disk cache entries are keyed on this file and the modules it imports (simd.py, q8.py;
`numba_cache.source_stamp`), so an edit to any of them recompiles.
"""
from __future__ import annotations

import numpy as np

from .q8 import quantize_row, quantize_x, x_buffers
from .simd import LANES, TOKENS

prange = range        # replaced by numba.prange when the kernels are compiled
vdot8_nib = vdot8_q4_k = q4_k_scales = vdot_q5_0 = vdot8_q8_0 = vdot8_q6_k = vdot8_mxfp4 = vdot8_nib_t = vdot8_q8_0_t = None
vdot8_q6_k_t = vdot8_mxfp4_t = None   # the intrinsics of simd.py, set by _jit()
deq_nib = deq_q4_0 = deq_q5_0 = deq_q8_0 = deq_q6_k = deq_mxfp4 = None


# Shapes: ng groups of G rows (G a multiple of 16), nb 32-value blocks per row, n rows of x;
# out f32 [n, rows] with rows <= ng * G (padding rows are not written). Threads split the
# groups; each group keeps its G sums in `acc`. Block sums of x are taken once per call,
# before the parallel loop.

def _block_sums(x, size):
    """x [n, cols] -> [n, cols // size]: float32 sums of each `size` consecutive values."""
    n, cols = x.shape
    xs = np.empty((n, cols // size), np.float32)
    for i in range(n):
        for b in range(cols // size):
            s = np.float32(0.0)
            for j in range(size):
                s += x[i, b * size + j]
            xs[i, b] = s
    return xs


def _store(out, i, r0, acc):
    """out[i, r0:r0+G] = acc, skipping padding rows."""
    for l in range(min(acc.shape[0], out.shape[1] - r0)):
        out[i, r0 + l] = acc[l]



def _k_nib(qs, d, m, x, out):
    """qs u8 [ng, nb, 4, G, 4] dwords; d, m [ng, nb, G]; x [n, nb*32] (quantized here to int8)."""
    ng, nb, _, G, _ = qs.shape
    xq, dx, xqs = quantize_x(x)
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_nib(qs[g, b], G, l0, m[g, b], xq[i], b * 32, d[g, b], xqs[i, b], dx[i, b], acc)
            _store(out, i, g * G, acc)


def _q4_k_scales(scm, dd, dmn, g, b, dv, mv):
    """dv, mv [G] = d * sc, -dmin * mn of sub-block b of group g: the float products of
    `quants.dequantize`, formed here from the packed 6-bit bytes (the repacked copy keeps GGML's
    0.5625 bytes per weight instead of 0.75 with two float32 per 32 values)."""
    s = b // 8
    for l0 in range(0, dv.shape[0], LANES):
        q4_k_scales(scm[g, s], b % 8, dv.shape[0], dd[g, s], dmn[g, s], l0, dv, mv)


def _k_q4_k(qs, scm, dd, dmn, x, out):
    """qs u8 [ng, nb, 4, G, 4] dwords; scm u8 [ng, nb/8, 12, G] packed 6-bit scales and mins; dd, dmn u16
    (f16 bits) [ng, nb/8, G]; x quantized here."""
    ng, nb, _, G, _ = qs.shape
    xq, dx, xqs = quantize_x(x)
    for g in prange(ng):
        acc = np.empty((x.shape[0], G), np.float32)
        acc[:] = 0.0
        for b in range(nb):
            for i in range(x.shape[0]):
                for l0 in range(0, G, LANES):
                    vdot8_q4_k(qs[g, b], G, l0, scm[g, b // 8], b % 8, dd[g, b // 8], dmn[g, b // 8], xq[i], b * 32,
                               xqs[i, b], dx[i, b], acc[i])
        for i in range(x.shape[0]):
            _store(out, i, g * G, acc[i])


def _k_mxfp4(qs, e, x, out):
    """qs u8 [ng, nb, 4, G, 4] dwords of E2M1 codes; e u8 [ng, nb, G] E8M0 scales; x quantized here."""
    ng, nb, _, G, _ = qs.shape
    xq, dx, xqs = quantize_x(x)
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_mxfp4(qs[g, b], G, l0, xq[i], b * 32, e[g, b], xqs[i, b], dx[i, b], acc)
            _store(out, i, g * G, acc)


def _k_mxfp4_experts(qs, e, x, out):
    """k experts' _k_mxfp4 in one parallel loop: qs, e tuples of k experts' arrays (one shape);
    x [1, cols] (one input for all: gate, up) or [k, cols] (row j for expert j: down); out [k, rows].
    The threads share k * ng groups instead of ng per call; each row's numbers are _k_mxfp4's."""
    k = len(qs)
    ng, nb, _, G, _ = qs[0].shape
    xq, dx, xqs = quantize_x(x)
    for w in prange(k * ng):
        j, g = w // ng, w % ng
        i = 0 if x.shape[0] == 1 else j
        q, sc = qs[j], e[j]
        acc = np.zeros(G, np.float32)
        for b in range(nb):
            for l0 in range(0, G, LANES):
                vdot8_mxfp4(q[g, b], G, l0, xq[i], b * 32, sc[g, b], xqs[i, b], dx[i, b], acc)
        _store(out, j, g * G, acc)


def _k_q5_0(qs, qh, d, x, out):
    """qs u8 [ng, nb, 16, G]; qh u8 [ng, nb, 4, G]; d [ng, nb, G]."""
    ng, nb, _, G = qs.shape
    xs = _block_sums(x, 32)
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot_q5_0(qs[g, b], G, l0, qh[g, b], x[i], b * 32, d[g, b], xs[i, b], acc)
            _store(out, i, g * G, acc)


def _k_q8_0(qs, d, x, out):
    """qs u8 [ng, nb, 8, G, 4] dwords of q + 128; d [ng, nb, G]; x [n, nb*32] (quantized here)."""
    ng, nb, _, G, _ = qs.shape
    xq, dx, xqs = quantize_x(x)
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_q8_0(qs[g, b], G, l0, xq[i], b * 32, d[g, b], xqs[i, b], dx[i, b], acc)
            _store(out, i, g * G, acc)


def _half_sums(xq):
    """xq int8 [n, cols] -> int32 [n, cols // 16]: the sums of each 16 values (Q6_K's scale halves)."""
    n, cols = xq.shape
    xh = np.empty((n, cols // 16), np.int32)
    for i in range(n):
        for h in range(cols // 16):
            t = 0
            for j in range(16):
                t += xq[i, 16 * h + j]
            xh[i, h] = t
    return xh


def _k_q6_k(qs, qh, sc, dd, x, out):
    """qs u8 [ng, nb, 4, G, 4], qh u8 [ng, nb, 2, G, 4] dwords; sc i8 [ng, nb, 2, G]; dd u16 (f16 bits) [ng, nb/8, G];
    x quantized here (int8 per 32 values, as for Q4_K: llama.cpp's Q8_K activations do the same)."""
    ng, nb, _, G, _ = qs.shape
    xq, dx, xqs = quantize_x(x)
    xh = _half_sums(xq)
    for g in prange(ng):
        acc = np.empty((x.shape[0], G), np.float32)
        acc[:] = 0.0
        for b in range(nb):
            for i in range(x.shape[0]):
                for l0 in range(0, G, LANES):
                    vdot8_q6_k(qs[g, b], G, l0, qh[g, b], sc[g, b], dd[g, b // 8], xq[i], b * 32,
                               xh[i, 2 * b], xh[i, 2 * b + 1], dx[i, b], acc[i])
        for i in range(x.shape[0]):
            _store(out, i, g * G, acc[i])


# ---------------------------------------------------------------------------- int8 GEMM (prefill, batches)
# The same products for many rows of x: each thread takes a group of G weight rows (~200 KB for
# an 8B layer's Q4_K, so it stays in L2) and runs every token through it, TOKENS at a time, so
# a weight dword is loaded and unpacked once per TOKENS tokens. The leftover tokens (n % TOKENS)
# go through the one-token dot. Row i of the result equals the mat-vec of x[i] alone, bit for bit.

def _m_nib(qs, d, m, x, out):
    """qs u8 [ng, nb, 4, G, 4] dwords; d, m [ng, nb, G]; x [n, nb*32] -> out [n, rows]."""
    ng, nb, _, G, _ = qs.shape
    n, cols = x.shape
    xq, dx, xqs = x_buffers(x)
    for i in prange(n):                          # each row's int8 x on its own thread
        quantize_row(x, i, xq, dx, xqs)
    full = n - n % TOKENS
    for g in prange(ng):
        acc = np.empty((TOKENS, G), np.float32)
        for i0 in range(0, full, TOKENS):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_nib_t(qs[g, b], G, l0, m[g, b], d[g, b], xq, i0 * cols + b * 32, xqs, dx, i0 * nb + b, cols, nb, acc)
            for u in range(TOKENS):
                _store(out, i0 + u, g * G, acc[u])
        for i in range(full, n):
            acc[0, :] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_nib(qs[g, b], G, l0, m[g, b], xq[i], b * 32, d[g, b], xqs[i, b], dx[i, b], acc[0])
            _store(out, i, g * G, acc[0])


def _m_q4_k(qs, scm, dd, dmn, x, out):
    """_m_nib for the Q4_K layout (scm packed 6-bit bytes, dd, dmn per super-block) -> out [n, rows]."""
    ng, nb, _, G, _ = qs.shape
    n, cols = x.shape
    xq, dx, xqs = x_buffers(x)
    for i in prange(n):                          # each row's int8 x on its own thread
        quantize_row(x, i, xq, dx, xqs)
    full = n - n % TOKENS
    for g in prange(ng):
        acc = np.empty((TOKENS, G), np.float32)
        dv = np.empty((nb, G), np.float32)       # the group's scale products, formed once for all its tokens
        mv = np.empty((nb, G), np.float32)
        for b in range(nb):
            _q4_k_scales(scm, dd, dmn, g, b, dv[b], mv[b])
        for i0 in range(0, full, TOKENS):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_nib_t(qs[g, b], G, l0, mv[b], dv[b], xq, i0 * cols + b * 32, xqs, dx, i0 * nb + b, cols, nb, acc)
            for u in range(TOKENS):
                _store(out, i0 + u, g * G, acc[u])
        for i in range(full, n):
            acc[0, :] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_nib(qs[g, b], G, l0, mv[b], xq[i], b * 32, dv[b], xqs[i, b], dx[i, b], acc[0])
            _store(out, i, g * G, acc[0])


def _m_q8_0(qs, d, x, out):
    """qs u8 [ng, nb, 8, G, 4] dwords of q + 128; d [ng, nb, G]; x [n, nb*32] -> out [n, rows]."""
    ng, nb, _, G, _ = qs.shape
    n, cols = x.shape
    xq, dx, xqs = x_buffers(x)
    for i in prange(n):                          # each row's int8 x on its own thread
        quantize_row(x, i, xq, dx, xqs)
    full = n - n % TOKENS
    for g in prange(ng):
        acc = np.empty((TOKENS, G), np.float32)
        for i0 in range(0, full, TOKENS):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_q8_0_t(qs[g, b], G, l0, d[g, b], d[g, b], xq, i0 * cols + b * 32, xqs, dx, i0 * nb + b, cols, nb, acc)
            for u in range(TOKENS):
                _store(out, i0 + u, g * G, acc[u])
        for i in range(full, n):
            acc[0, :] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_q8_0(qs[g, b], G, l0, xq[i], b * 32, d[g, b], xqs[i, b], dx[i, b], acc[0])
            _store(out, i, g * G, acc[0])


def _m_q6_k(qs, qh, sc, dd, x, out):
    """_k_q6_k's layout through the GEMM: x [n, nb*32] -> out [n, rows]."""
    ng, nb, _, G, _ = qs.shape
    n, cols = x.shape
    xq, dx, xqs = x_buffers(x)
    for i in prange(n):                          # each row's int8 x on its own thread
        quantize_row(x, i, xq, dx, xqs)
    xh = _half_sums(xq)
    full = n - n % TOKENS
    for g in prange(ng):
        acc = np.empty((TOKENS, G), np.float32)
        for i0 in range(0, full, TOKENS):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_q6_k_t(qs[g, b], G, l0, qh[g, b], sc[g, b], dd[g, b // 8], xq, i0 * cols + b * 32, xh, dx,
                                 i0 * nb + b, cols, nb, acc)
            for u in range(TOKENS):
                _store(out, i0 + u, g * G, acc[u])
        for i in range(full, n):
            acc[0, :] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_q6_k(qs[g, b], G, l0, qh[g, b], sc[g, b], dd[g, b // 8], xq[i], b * 32,
                               xh[i, 2 * b], xh[i, 2 * b + 1], dx[i, b], acc[0])
            _store(out, i, g * G, acc[0])


def _m_mxfp4(qs, e, x, out):
    """_k_mxfp4's layout through the GEMM: x [n, nb*32] -> out [n, rows]."""
    ng, nb, _, G, _ = qs.shape
    n, cols = x.shape
    xq, dx, xqs = x_buffers(x)
    for i in prange(n):                          # each row's int8 x on its own thread
        quantize_row(x, i, xq, dx, xqs)
    full = n - n % TOKENS
    for g in prange(ng):
        acc = np.empty((TOKENS, G), np.float32)
        for i0 in range(0, full, TOKENS):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_mxfp4_t(qs[g, b], G, l0, e[g, b], e[g, b], xq, i0 * cols + b * 32, xqs, dx, i0 * nb + b, cols, nb, acc)
            for u in range(TOKENS):
                _store(out, i0 + u, g * G, acc[u])
        for i in range(full, n):
            acc[0, :] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot8_mxfp4(qs[g, b], G, l0, xq[i], b * 32, e[g, b], xqs[i, b], dx[i, b], acc[0])
            _store(out, i, g * G, acc[0])


# ---------------------------------------------------------------------------- tile dequantizers (prefill)
# Groups g0..g1 of a repacked weight -> tile f32 [cols, (g1 - g0) * G]: the dequantized rows
# g0*G .. g1*G, transposed, so that lane l of a group is a contiguous column and the G lanes
# of a byte row are stored side by side (SIMD over lanes, as in the mat-vec). Every value is
# computed with the float32 operations of `quants.dequantize`, in the same order (no fused
# multiply-add: fastmath=False), so the tile is bit-identical to it. Threads split the groups.

def _t_nib(qs, d, m, sub8, g0, g1, tile):
    """qs u8 [ng, nb, 4, G, 4] dwords; d, m [ng, nb, G]; sub8: Q4_0's d * (q - 8), else d * q + m."""
    _, nb, _, G, _ = qs.shape
    nc = tile.shape[1]
    for g in prange(g0, g1):
        c0 = (g - g0) * G
        for b in range(nb):
            for l0 in range(0, G, LANES):
                if sub8:
                    deq_q4_0(qs[g, b], G, l0, d[g, b], m[g, b], tile, b * 32, c0 + l0, nc)
                else:
                    deq_nib(qs[g, b], G, l0, d[g, b], m[g, b], tile, b * 32, c0 + l0, nc)


def _t_q4_k(qs, scm, dd, dmn, g0, g1, tile):
    """qs u8 [ng, nb, 4, G, 4] dwords; scm u8 [ng, nb/8, 12, G]; dd, dmn u16 (f16 bits) [ng, nb/8, G]: d * q + m."""
    _, nb, _, G, _ = qs.shape
    nc = tile.shape[1]
    for g in prange(g0, g1):
        c0 = (g - g0) * G
        dv = np.empty(G, np.float32)
        mv = np.empty(G, np.float32)
        for b in range(nb):
            _q4_k_scales(scm, dd, dmn, g, b, dv, mv)
            for l0 in range(0, G, LANES):
                deq_nib(qs[g, b], G, l0, dv, mv, tile, b * 32, c0 + l0, nc)


def _t_mxfp4(qs, e, g0, g1, tile):
    """qs u8 [ng, nb, 4, G, 4] dwords of E2M1 codes; e u8 [ng, nb, G]."""
    _, nb, _, G, _ = qs.shape
    nc = tile.shape[1]
    for g in prange(g0, g1):
        for b in range(nb):
            for l0 in range(0, G, LANES):
                deq_mxfp4(qs[g, b], G, l0, e[g, b], tile, b * 32, (g - g0) * G + l0, nc)


def _t_q5_0(qs, qh, d, g0, g1, tile):
    """qs u8 [ng, nb, 16, G]; qh u8 [ng, nb, 4, G]; d [ng, nb, G]."""
    _, nb, _, G = qs.shape
    nc = tile.shape[1]
    for g in prange(g0, g1):
        for b in range(nb):
            for l0 in range(0, G, LANES):
                deq_q5_0(qs[g, b], G, l0, qh[g, b], d[g, b], tile, b * 32, (g - g0) * G + l0, nc)


def _t_q8_0(qs, d, g0, g1, tile):
    """qs u8 [ng, nb, 8, G, 4] dwords of q + 128; d [ng, nb, G]."""
    _, nb, _, G, _ = qs.shape
    nc = tile.shape[1]
    for g in prange(g0, g1):
        for b in range(nb):
            for l0 in range(0, G, LANES):
                deq_q8_0(qs[g, b], G, l0, d[g, b], tile, b * 32, (g - g0) * G + l0, nc)


def _t_q6_k(qs, qh, sc, dd, g0, g1, tile):
    """qs u8 [ng, nb, 4, G, 4], qh u8 [ng, nb, 2, G, 4] dwords; sc i8 [ng, nb, 2, G]; dd u16 (f16 bits) [ng, nb/8, G]."""
    _, nb, _, G, _ = qs.shape
    nc = tile.shape[1]
    for g in prange(g0, g1):
        for b in range(nb):
            for l0 in range(0, G, LANES):
                deq_q6_k(qs[g, b], G, l0, qh[g, b], sc[g, b], dd[g, b // 8], tile, b * 32, (g - g0) * G + l0, nc)


SOURCES = {"m_nib": _m_nib, "m_q4_k": _m_q4_k, "m_q8_0": _m_q8_0, "m_q6_k": _m_q6_k, "m_mxfp4": _m_mxfp4, "nib": _k_nib, "q4_k": _k_q4_k, "q5_0": _k_q5_0,
           "q8_0": _k_q8_0, "q6_k": _k_q6_k, "mxfp4": _k_mxfp4, "mxfp4_experts": _k_mxfp4_experts,
           "t_nib": _t_nib, "t_q4_k": _t_q4_k, "t_q5_0": _t_q5_0, "t_q8_0": _t_q8_0, "t_q6_k": _t_q6_k,
           "t_mxfp4": _t_mxfp4}
