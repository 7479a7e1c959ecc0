"""GGML block formats: a (block_size, type_size) table, one vectorized dequantizer per type,
and a quantized matmul that never holds the whole float32 weight.

A quantized tensor is a run of fixed-size blocks: `block_size` values packed into `type_size`
bytes (scales first or last, then packed integer codes). Rows never share a block, so a
[rows, cols] weight is stored as uint8 [rows, cols // block_size * type_size].

Every dequantizer takes uint8 blocks [n_blocks, type_size] and the array module `xp`, and
returns float32 [n_blocks, block_size]. They are bit-exact with `gguf.quants.dequantize`
(same float32 operations in the same order; NumPy never fuses a multiply and an add), and
they run unchanged on CuPy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from .ggml_types import GGMLQuantizationType as QT

from .device import array_module

QK_K = 256  # super-block size of the K-quants

# qtype -> (values per block, bytes per block)
# Types whose products see x rounded to int8 per 32-value block (llama.cpp's Q8 activations): the
# CPU kernels' dots (kernels.qmatvec) and, so that both give the same tokens, the GPU's products.
INT8_X_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.MXFP4)

BLOCK_SIZES: dict[QT, tuple[int, int]] = {
    QT.F32: (1, 4),
    QT.F16: (1, 2),
    QT.BF16: (1, 2),
    QT.Q4_0: (32, 2 + 16),                                # d f16, 32 x 4-bit
    QT.Q4_1: (32, 2 + 2 + 16),                            # d f16, m f16, 32 x 4-bit
    QT.Q5_0: (32, 2 + 4 + 16),                            # d, 32 high bits, 32 x 4-bit
    QT.Q5_1: (32, 2 + 2 + 4 + 16),                        # d, m, high bits, 4-bit
    QT.Q8_0: (32, 2 + 32),                                # d, 32 x int8
    QT.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),      # scales|mins 4+4 bit, 2-bit q, d, dmin
    QT.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),      # high-bit mask, 2-bit q, 6-bit scales, d
    QT.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),              # d, dmin, 6-bit scales/mins, 4-bit q
    QT.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # d, dmin, scales, high bits, 4-bit q
    QT.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # low 4 bits, high 2 bits, int8 scales, d
    QT.Q8_K: (QK_K, 4 + QK_K + QK_K // 8),                # d f32, 256 x int8, 16 int16 block sums
    QT.MXFP4: (32, 1 + 16),                               # E8M0 scale byte, 32 x E2M1 (4-bit float)
    QT.NVFP4: (64, 4 + 32),                               # 4 UE4M3 scale bytes (one per 16), 64 x E2M1
    QT.IQ4_NL: (32, 2 + 16),                              # d, 32 x 4-bit index into a non-linear table
    QT.IQ4_XS: (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),    # d, 6-bit scales (2 high bits | 4 low), 4-bit idx
    QT.IQ2_XXS: (QK_K, 2 + QK_K // 4),                    # d, 8 x (4 grid bytes, u32 of signs + scale)
    QT.IQ2_XS: (QK_K, 2 + QK_K // 4 + QK_K // 32),        # d, 32 x u16 (9-bit grid | 7-bit signs), scales
    QT.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 16),         # d, grid low bytes, sign bytes, grid high bits, scales
    QT.IQ3_XXS: (QK_K, 2 + QK_K // 4 + QK_K // 8),        # d, 64 grid bytes, 8 x u32 signs + scale
    QT.IQ3_S: (QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + 4),  # d, grid low, grid high bits, signs, scales
    QT.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),         # d, grid low bytes, 8 x u16 (high bits, scale, delta)
    QT.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),  # grid low, high bits|delta, 3-bit scales + d
    QT.TQ1_0: (QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2),  # base-3 packed trits (5 per byte), d
    QT.TQ2_0: (QK_K, QK_K // 4 + 2),                      # 2-bit trits, d
}


def as_qtype(qtype) -> QT:
    """A GGMLQuantizationType from the enum, its int value or its name ("Q4_K", "q4_k")."""
    if isinstance(qtype, QT):
        q = qtype
    else:
        try:
            q = QT[qtype.upper()] if isinstance(qtype, str) else QT(int(qtype))
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"unknown GGML quant type {qtype!r}") from None
    if q not in BLOCK_SIZES:
        names = ", ".join(t.name for t in BLOCK_SIZES)
        raise ValueError(f"quant type {q.name} is not supported by spark_lab (supported: {names})")
    return q


# ---------------------------------------------------------------------------- helpers

def _f16(b, xp):
    """uint8 [n, 2] little-endian halves -> float32 [n, 1]."""
    return xp.ascontiguousarray(b).view(xp.float16).astype(xp.float32)


def _nibbles(qs, xp):
    """uint8 [n, k, 16*j] -> [n, k, 2, 16*j]: low nibbles first, then high nibbles."""
    return xp.stack([qs & 0x0F, qs >> 4], axis=-2)


def _bits(b, n_bits, xp):
    """uint8 [n, m] -> uint8 [n, n_bits, m]: plane i holds bit i of every byte."""
    shifts = xp.arange(n_bits, dtype=xp.uint8).reshape(1, n_bits, 1)
    return (b[:, None, :] >> shifts) & 1


def _k_scale_min(s, xp):
    """Q4_K/Q5_K 12-byte packed 6-bit scales and mins -> two uint8 [n, 8]."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = xp.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1)
    mn = xp.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
    return sc, mn


# ---------------------------------------------------------------------------- one function per type
# Each: blocks uint8 [n, type_size] -> float32 [n, block_size]

def _deq_f32(b, xp):
    return xp.ascontiguousarray(b).view(xp.float32)


def _deq_f16(b, xp):
    return xp.ascontiguousarray(b).view(xp.float16).astype(xp.float32)


def _deq_bf16(b, xp):
    h = xp.ascontiguousarray(b).view(xp.uint16).astype(xp.uint32)
    return (h << 16).view(xp.float32)


def _deq_q4_0(b, xp):
    d = _f16(b[:, :2], xp)                                         # [n, 1]
    q = _nibbles(b[:, 2:], xp).reshape(len(b), 32)                 # [n, 32] in 0..15
    return d * (q.astype(xp.float32) - 8.0)


def _deq_q4_1(b, xp):
    d, m = _f16(b[:, 0:2], xp), _f16(b[:, 2:4], xp)
    q = _nibbles(b[:, 4:], xp).reshape(len(b), 32).astype(xp.float32)
    return d * q + m


def _q5_codes(qh, qs, xp):
    """32 high bits (4 bytes, little-endian) + 16 nibble bytes -> uint8 [n, 32] in 0..31."""
    hi = _bits(qh, 8, xp).transpose(0, 2, 1).reshape(len(qh), 32)   # element j = bit j of the u32
    return _nibbles(qs, xp).reshape(len(qs), 32) | (hi << 4)


def _deq_q5_0(b, xp):
    d = _f16(b[:, 0:2], xp)
    q = _q5_codes(b[:, 2:6], b[:, 6:], xp)
    return d * (q.astype(xp.float32) - 16.0)


def _deq_q5_1(b, xp):
    d, m = _f16(b[:, 0:2], xp), _f16(b[:, 2:4], xp)
    q = _q5_codes(b[:, 4:8], b[:, 8:], xp)
    return d * q.astype(xp.float32) + m


def _deq_q8_0(b, xp):
    d = _f16(b[:, :2], xp)
    q = xp.ascontiguousarray(b[:, 2:]).view(xp.int8).astype(xp.float32)
    return q * d


def _deq_q2_k(b, xp):
    n = len(b)
    s, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82], xp), _f16(b[:, 82:84], xp)
    dl = (d * (s & 0x0F).astype(xp.float32))[:, :, None]          # [n, 16, 1]
    ml = (dmin * (s >> 4).astype(xp.float32))[:, :, None]
    shifts = xp.asarray([0, 2, 4, 6], dtype=xp.uint8).reshape(1, 1, 4, 1)
    q = (qs.reshape(n, 2, 1, 32) >> shifts) & 3                    # [n, 2 halves, 4 shifts, 32]
    q = q.reshape(n, 16, 16).astype(xp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q3_k(b, xp):
    n = len(b)
    hmask, qs, s = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110], xp)
    lo = _nibbles(s[:, 0:8], xp).reshape(n, 16)                    # low 4 bits of 16 scales
    shifts = xp.asarray([0, 2, 4, 6], dtype=xp.uint8).reshape(1, 4, 1)
    hi = ((s[:, None, 8:12] >> shifts) & 3).reshape(n, 16)         # high 2 bits
    sc = ((lo | (hi << 4)).astype(xp.int8) - 32).astype(xp.float32)
    dl = (d * sc)[:, :, None]                                      # [n, 16, 1]
    shifts = xp.asarray([0, 2, 4, 6], dtype=xp.uint8).reshape(1, 1, 4, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16)
    h = _bits(hmask, 8, xp).reshape(n, 16, 16)                     # a set bit means "no -4"
    q = ql.astype(xp.int8) - ((h ^ 1) << 2).astype(xp.int8)
    return (dl * q.astype(xp.float32)).reshape(n, QK_K)


def _deq_q4_k(b, xp):
    n = len(b)
    d, dmin = _f16(b[:, 0:2], xp), _f16(b[:, 2:4], xp)
    sc, mn = _k_scale_min(b[:, 4:16], xp)
    dl = (d * sc.astype(xp.float32))[:, :, None]                   # [n, 8, 1]
    ml = (dmin * mn.astype(xp.float32))[:, :, None]
    q = _nibbles(b[:, 16:].reshape(n, 4, 32), xp).reshape(n, 8, 32).astype(xp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q5_k(b, xp):
    n = len(b)
    d, dmin = _f16(b[:, 0:2], xp), _f16(b[:, 2:4], xp)
    sc, mn = _k_scale_min(b[:, 4:16], xp)
    dl = (d * sc.astype(xp.float32))[:, :, None]
    ml = (dmin * mn.astype(xp.float32))[:, :, None]
    qh, qs = b[:, 16:48], b[:, 48:]
    lo = _nibbles(qs.reshape(n, 4, 32), xp).reshape(n, 8, 32)
    hi = _bits(qh, 8, xp)                                          # [n, 8 sub-blocks, 32]
    q = (lo | (hi << 4)).astype(xp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q6_k(b, xp):
    n = len(b)
    ql, qh, s = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210], xp)
    dl = (d * xp.ascontiguousarray(s).view(xp.int8).astype(xp.float32))[:, :, None]  # [n, 16, 1]
    lo = _nibbles(ql.reshape(n, 2, 64), xp).reshape(n, 8, 32)      # per 128-half: 64 low, 64 high nibbles
    shifts = xp.asarray([0, 2, 4, 6], dtype=xp.uint8).reshape(1, 1, 4, 1)
    hi = ((qh.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (lo | (hi << 4)).astype(xp.int8) - 32
    return (dl * q.reshape(n, 16, 16).astype(xp.float32)).reshape(n, QK_K)


def _deq_q8_k(b, xp):
    d = xp.ascontiguousarray(b[:, 0:4]).view(xp.float32)           # [n, 1]
    q = xp.ascontiguousarray(b[:, 4:4 + QK_K]).view(xp.int8).astype(xp.float32)
    return d * q


# ---------------------------------------------------------------------------- 4-bit floats and trits

def _e2m1_doubled():
    """The 16 E2M1 codes (sign, 2-bit exponent, 1-bit mantissa, bias 1) as twice their value:
    integers {0, 1, 2, 3, 4, 6, 8, 12} and their negatives. GGML stores the values doubled
    and halves the block scale instead, so the codes stay integers (int8 dots work)."""
    out = []
    for c in range(16):
        e, m = (c >> 1) & 3, c & 1
        v = m if e == 0 else (2 + m) << (e - 1)                    # 2 * (1 + m/2) * 2^(e-1)
        out.append(-v if c & 8 else v)
    return np.array(out, np.int8)


E2M1_X2 = _e2m1_doubled()
# E8M0 scale byte e -> 2^(e - 127), halved for the doubled codes (e = 0 gives the subnormal 2^-128)
E8M0_HALF = np.ldexp(np.ones(256, np.float32), np.arange(256) - 128).astype(np.float32)


def _ue4m3_half():
    """UE4M3 scale byte (unsigned, 4-bit exponent with bias 7, 3-bit mantissa) -> float32 value / 2,
    as gguf-py reads it: bit 7 ignored, 0x7F (the NaN code) read as 0."""
    x = np.arange(256)
    e, m = (x >> 3) & 15, (x & 7).astype(np.float64)
    v = np.where(e == 0, m * 2.0 ** -9, (8 + m) * 2.0 ** (e - 10))
    return np.where(x == 0x7F, 0.0, v * 0.5).astype(np.float32)


UE4M3_HALF = _ue4m3_half()


def _deq_mxfp4(b, xp):
    d = xp.asarray(E8M0_HALF)[b[:, 0]][:, None]                    # [n, 1]
    q = _nibbles(b[:, 1:], xp).reshape(len(b), 32)                 # low nibbles = values 0..15
    return d * xp.asarray(E2M1_X2)[q].astype(xp.float32)


def _deq_nvfp4(b, xp):
    n = len(b)
    d = xp.asarray(UE4M3_HALF)[b[:, 0:4]][:, :, None]              # [n, 4 sub-blocks, 1]
    q = _nibbles(b[:, 4:].reshape(n, 4, 8), xp).reshape(n, 4, 16)  # per 16: 8 low nibbles, 8 high
    return (d * xp.asarray(E2M1_X2)[q].astype(xp.float32)).reshape(n, 64)


def _trits_base3(p, k, xp):
    """uint8 bytes holding k base-3 digits as a fraction of 256 -> the digits 0..2 in order:
    digit i of byte c is (c * 3^i mod 256) * 3 >> 8.  p [n, m] -> int8 [n, k, m]."""
    pow3 = xp.asarray([1, 3, 9, 27, 81][:k], dtype=xp.uint8)
    t = p[:, None, :] * pow3[None, :, None]                         # uint8: wraps mod 256
    return ((t.astype(xp.uint16) * 3) >> 8).astype(xp.int8)


def _deq_tq1_0(b, xp):
    n = len(b)
    d = _f16(b[:, 52:54], xp)
    q = xp.concatenate([_trits_base3(b[:, 0:32], 5, xp).reshape(n, 160), _trits_base3(b[:, 32:48], 5, xp).reshape(n, 80),
                        _trits_base3(b[:, 48:52], 4, xp).reshape(n, 16)], axis=1)
    return d * (q - 1).astype(xp.float32)


def _deq_tq2_0(b, xp):
    n = len(b)
    d = _f16(b[:, 64:66], xp)
    shifts = xp.asarray([0, 2, 4, 6], dtype=xp.uint8).reshape(1, 1, 4, 1)
    q = ((b[:, 0:64].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, QK_K).astype(xp.int8)
    return d * (q - 1).astype(xp.float32)


# ---------------------------------------------------------------------------- IQ types
# Lattice codebooks ("grids") are data: read from gguf-py's tables (hex-packed indices into a
# short list of levels) once, decoded here. Sign patterns: a 7-bit index i gives 8 signs, bit 7
# set so that the number of minus signs is even (the parity of i).

def _ksigns():
    """[128, 8] float32 +-1: sign pattern of each 7-bit index (bit j set = value j negative)."""
    i = np.arange(128)
    parity = np.array([bin(v).count("1") & 1 for v in i])
    bits = ((i | (parity << 7))[:, None] >> np.arange(8)) & 1
    return np.where(bits == 1, -1.0, 1.0).astype(np.float32)


def _grid(name):
    """gguf-py's packed lattice table of type `name` -> float32 [points, values per point]."""
    import gguf.quants as gq
    cls = getattr(gq, name)
    levels = np.asarray(cls.grid_map, np.float32)
    bits = max(1, int(len(levels) - 1).bit_length())               # 3 levels: 2 bits; 8: 3
    step = 8 // (8 // bits)                                          # indices sit at 2- or 4-bit strides
    packed = np.frombuffer(bytes.fromhex(cls.grid_hex.decode()), np.uint8)
    idx = (packed[:, None] >> np.arange(0, 8, step, dtype=np.uint8)) & ((1 << bits) - 1)
    return levels[idx.reshape(-1)].reshape(cls.grid_shape)


_TABLES: dict = {}


def _table(name, xp):
    """Decoded IQ tables, cached per array module: 'ksigns', a grid name, or 'iq4nl'."""
    key = (name, xp)          # the module itself: the strict stand-in calls itself "cupy" too
    t = _TABLES.get(key)
    if t is None:
        if name == "ksigns":
            host = _ksigns()
        elif name == "iq4nl":
            import gguf.quants as gq
            host = np.asarray(gq.IQ4_NL.kvalues, np.int8).astype(np.float32)
        else:
            host = _grid(name)
        t = _TABLES[key] = xp.asarray(host)
    return t


def _sign_bits(s, xp):
    """uint8 [...] sign bytes -> float32 [..., 8] +-1 (bit j set = value j negative)."""
    bits = (s[..., None] >> xp.arange(8, dtype=xp.uint8)) & 1
    return 1.0 - 2.0 * bits.astype(xp.float32)


def _u32(b, xp):
    return xp.ascontiguousarray(b).view(xp.uint32)


def _u16(b, xp):
    return xp.ascontiguousarray(b).view(xp.uint16)


def _low_high_nibbles(s, xp):
    """uint8 [n, m] -> [n, 2m]: byte j's low nibble, then its high nibble, byte by byte."""
    return xp.stack([s & 0x0F, s >> 4], axis=-1).reshape(len(s), -1)


def _deq_iq4_nl(b, xp):
    d = _f16(b[:, :2], xp)
    q = _nibbles(b[:, 2:], xp).reshape(len(b), 32)
    return d * _table("iq4nl", xp)[q]


def _deq_iq4_xs(b, xp):
    n = len(b)
    d = _f16(b[:, 0:2], xp)
    hi = (_u16(b[:, 2:4], xp) >> xp.arange(0, 16, 2, dtype=xp.uint16)) & 3    # [n, 8] 2 high bits
    lo = _low_high_nibbles(b[:, 4:8], xp)                                       # [n, 8] 4 low bits
    sc = (lo | (hi.astype(xp.uint8) << 4)).astype(xp.int8) - 32
    dl = (d * sc.astype(xp.float32))[:, :, None]                               # [n, 8, 1]
    q = _nibbles(b[:, 8:].reshape(n, 8, 16), xp).reshape(n, 8, 32)
    return (dl * _table("iq4nl", xp)[q]).reshape(n, QK_K)


def _deq_iq2_xxs(b, xp):
    n = len(b)
    d = _f16(b[:, :2], xp)
    w = _u32(b[:, 2:], xp).reshape(n, 8, 2)                          # per 32 values: grid bytes, signs|scale
    db = (d * (0.5 + (w[:, :, 1] >> 28).astype(xp.float32)) * 0.25)[:, :, None, None]   # [n, 8, 1, 1]
    grid = _table("IQ2_XXS", xp)[b[:, 2:].reshape(n, 8, 8)[:, :, 0:4]]        # [n, 8, 4, 8]
    s = (w[:, :, 1, None] >> xp.asarray([0, 7, 14, 21], dtype=xp.uint32)) & 127
    return (db * grid * _table("ksigns", xp)[s]).reshape(n, QK_K)


def _deq_iq2_xs(b, xp):
    n = len(b)
    d = _f16(b[:, :2], xp)
    qs = _u16(b[:, 2:66], xp).reshape(n, 16, 2)                      # 9-bit grid index | 7-bit signs
    sc = _low_high_nibbles(b[:, 66:74], xp)                          # [n, 16], one per 16 values
    db = (d * (0.5 + sc.astype(xp.float32)) * 0.25)[:, :, None, None]
    grid = _table("IQ2_XS", xp)[qs & 511]                            # [n, 16, 2, 8]
    return (db * grid * _table("ksigns", xp)[qs >> 9]).reshape(n, QK_K)


def _deq_iq2_s(b, xp):
    n = len(b)
    d = _f16(b[:, :2], xp)
    qs, signs, qh, s = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    high = (qh[:, :, None] >> xp.asarray([0, 2, 4, 6], dtype=xp.uint8)) & 3       # [n, 8, 4]
    idx = qs.astype(xp.uint16) | (high.reshape(n, 32).astype(xp.uint16) << 8)
    db = (d * (0.5 + _low_high_nibbles(s, xp).astype(xp.float32)) * 0.25)[:, :, None, None]
    grid = _table("IQ2_S", xp)[idx].reshape(n, 16, 2, 8)
    return (db * grid * _sign_bits(signs, xp).reshape(n, 16, 2, 8)).reshape(n, QK_K)


def _deq_iq3_xxs(b, xp):
    n = len(b)
    d = _f16(b[:, :2], xp)
    w = _u32(b[:, 66:98], xp)                                        # [n, 8]: 4 x 7-bit signs | scale
    db = (d * (0.5 + (w >> 28).astype(xp.float32)) * 0.5)[:, :, None, None]
    grid = _table("IQ3_XXS", xp)[b[:, 2:66]].reshape(n, 8, 4, 8)      # 8 points of 4 per 32 values
    s = (w[:, :, None] >> xp.asarray([0, 7, 14, 21], dtype=xp.uint32)) & 127
    return (db * grid * _table("ksigns", xp)[s]).reshape(n, QK_K)


def _deq_iq3_s(b, xp):
    n = len(b)
    d = _f16(b[:, :2], xp)
    qs, qh, signs, s = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    idx = qs.astype(xp.uint16) | (_bits(qh, 8, xp).transpose(0, 2, 1).reshape(n, 64).astype(xp.uint16) << 8)
    db = (d * (1 + 2 * _low_high_nibbles(s, xp)).astype(xp.float32))[:, :, None, None]   # [n, 8, 1, 1]
    grid = _table("IQ3_S", xp)[idx].reshape(n, 8, 4, 8)
    return (db * grid * _sign_bits(signs, xp).reshape(n, 8, 4, 8)).reshape(n, QK_K)


def _deq_iq1_s(b, xp):
    n = len(b)
    d = _f16(b[:, :2], xp)
    qh = _u16(b[:, 34:50], xp)                                       # [n, 8]: 4 x 3 high bits, scale, delta sign
    dl = (d * (2 * ((qh >> 12) & 7) + 1).astype(xp.float32))[:, :, None, None]
    delta = xp.where(qh & 0x8000, -0.125, 0.125).astype(xp.float32)[:, :, None, None]
    high = (qh[:, :, None] >> xp.asarray([0, 3, 6, 9], dtype=xp.uint16)) & 7
    idx = b[:, 2:34].astype(xp.uint16) | (high.reshape(n, 32) << 8)
    grid = _table("IQ1_S", xp)[idx].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _deq_iq1_m(b, xp):
    n = len(b)
    qs, qh, s = b[:, 0:32], b[:, 32:48], _u16(b[:, 48:56], xp)   # s [n, 4]: 4 x 3-bit scales | 4 bits of d
    top = (s >> 12).astype(xp.uint16) << xp.asarray([0, 4, 8, 12], dtype=xp.uint16)
    d = (top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]).view(xp.float16).astype(xp.float32)[:, None]
    sc = ((s[:, :, None] >> xp.asarray([0, 3, 6, 9], dtype=xp.uint16)) & 7).reshape(n, 16)
    dl = (d * (2 * sc + 1).astype(xp.float32)).reshape(n, 8, 2, 1, 1)
    nib = _low_high_nibbles(qh, xp)                                  # [n, 32]: one per point
    idx = qs.astype(xp.uint16) | ((nib & 7).astype(xp.uint16) << 8)
    delta = xp.where(nib & 8, -0.125, 0.125).astype(xp.float32).reshape(n, 8, 2, 2, 1)
    grid = _table("IQ1_S", xp)[idx].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


_DEQUANT = {
    QT.F32: _deq_f32, QT.F16: _deq_f16, QT.BF16: _deq_bf16,
    QT.Q4_0: _deq_q4_0, QT.Q4_1: _deq_q4_1, QT.Q5_0: _deq_q5_0, QT.Q5_1: _deq_q5_1,
    QT.Q8_0: _deq_q8_0, QT.Q2_K: _deq_q2_k, QT.Q3_K: _deq_q3_k, QT.Q4_K: _deq_q4_k,
    QT.Q5_K: _deq_q5_k, QT.Q6_K: _deq_q6_k, QT.Q8_K: _deq_q8_k,
    QT.MXFP4: _deq_mxfp4, QT.NVFP4: _deq_nvfp4, QT.TQ1_0: _deq_tq1_0, QT.TQ2_0: _deq_tq2_0,
    QT.IQ4_NL: _deq_iq4_nl, QT.IQ4_XS: _deq_iq4_xs, QT.IQ2_XXS: _deq_iq2_xxs, QT.IQ2_XS: _deq_iq2_xs,
    QT.IQ2_S: _deq_iq2_s, QT.IQ3_XXS: _deq_iq3_xxs, QT.IQ3_S: _deq_iq3_s, QT.IQ1_S: _deq_iq1_s,
    QT.IQ1_M: _deq_iq1_m,
}


# ---------------------------------------------------------------------------- public API

def _as_bytes(data, xp):
    """Any array -> its raw bytes as uint8 with the last axis in bytes (no copy when contiguous)."""
    data = xp.ascontiguousarray(data)
    if data.ndim == 0:
        data = data.reshape(1)
    return data if data.dtype == xp.uint8 else data.view(xp.uint8)


def dequantize(data, qtype, shape=None):
    """Raw GGML blocks -> float32.

    data: raw bytes (uint8 [..., row_bytes], or an F32/F16 array as gguf's reader gives it).
    shape: the logical shape; default keeps the leading axes of `data` and turns its last
    axis of bytes into values (what `gguf.quants.dequantize` returns).
    """
    q = as_qtype(qtype)
    xp = array_module(data)
    raw = _as_bytes(data, xp)
    bs, ts = BLOCK_SIZES[q]
    if shape is None:
        row_bytes = raw.shape[-1]
        if row_bytes % ts:
            raise ValueError(f"{q.name} rows of {row_bytes} bytes are not a whole number of {ts}-byte blocks")
        shape = (*raw.shape[:-1], row_bytes // ts * bs)
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % bs:
        raise ValueError(f"{q.name} shape {shape}: the last dimension must be a multiple of its block size {bs}")
    n_values = int(np.prod(shape))
    want = n_values // bs * ts
    if raw.size != want:
        raise ValueError(f"{q.name} tensor of shape {shape} needs {want} bytes, got {raw.size}")
    blocks = raw.reshape(n_values // bs, ts)
    return _DEQUANT[q](blocks, xp).reshape(shape)


@dataclass
class QuantTensor:
    """A 2-D weight kept in its GGML block format.

    data:  uint8 [rows, row_bytes] raw blocks (numpy, a memmap view, or cupy)
    qtype: gguf.GGMLQuantizationType
    shape: (rows, cols) = (out_features, in_features), torch order
    """
    data: object
    qtype: QT
    shape: tuple
    packed: object = field(default=None, repr=False, compare=False)  # kernel-specific repack (qmatvec.prepare)

    def __post_init__(self):
        # the caller's array stays referenced: an allocator counts a placed view only while that
        # very object lives, and the reshaped view below would let it go (NumPy collapses bases)
        self.source = self.data
        self.qtype = as_qtype(self.qtype)
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"QuantTensor shape must be (rows, cols), got {self.shape}")
        rows, cols = self.shape
        bs, ts = BLOCK_SIZES[self.qtype]
        if cols % bs:
            raise ValueError(f"{self.qtype.name} shape {self.shape}: cols must be a multiple of its block size {bs}")
        xp = array_module(self.data)
        raw = _as_bytes(self.data, xp)
        row_bytes = cols // bs * ts
        if raw.size != rows * row_bytes:
            raise ValueError(f"{self.qtype.name} tensor of shape {self.shape} needs {rows * row_bytes} bytes, got {raw.size}")
        self.data = raw.reshape(rows, row_bytes)

    @classmethod
    def from_gguf(cls, tensor) -> "QuantTensor":
        """A 2-D `gguf.ReaderTensor` -> QuantTensor (zero-copy over the reader's memmap)."""
        cols, rows = (int(s) for s in tensor.shape)  # GGUF lists dims fastest-first
        return cls(tensor.data, tensor.tensor_type, (rows, cols))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def row_bytes(self) -> int:
        return int(self.data.shape[1])

    def dequantize(self):
        """-> float32 [rows, cols]."""
        return dequantize(self.data, self.qtype, self.shape)

    def rows(self, ids):
        """Embedding lookup: ids [n] int -> float32 [n, cols], dequantizing only those rows."""
        xp = array_module(self.data)
        ids = ids.reshape(-1) if hasattr(ids, "reshape") else np.asarray(ids).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):   # checked where the ids are:
            raise ValueError(f"row ids must be in [0, {self.shape[0]}), got min {int(ids.min())} max {int(ids.max())}")
        ids = xp.asarray(ids)                                       # host ids cost no device round trip
        raw = None
        if self.packed is not None and xp is np:                    # repacked: its raw pages may be released
            from .kernels.qmatvec import raw_rows
            raw = raw_rows(self, ids)
        return dequantize(self.data[ids] if raw is None else raw, self.qtype, (int(ids.size), self.shape[1]))


def quant_matmul(x, qt: QuantTensor, chunk_values: int = 1 << 16, fast: bool = True):
    """x @ dequant(qt).T without the whole float32 weight: x [n, in] or [in] -> [n, out] or [out].

    fast (NumPy arrays, numba installed, a type `kernels.qmatvec` repacks): the numba tile
    dequantizer over the repacked weight + BLAS (`kernels.qmatvec.qmatmul`); the float32 weight
    values are bit-identical to `dequantize`. Otherwise (or fast=False, the reference) output
    rows are dequantized here chunk by chunk, about `chunk_values` float32 values (256 KB)
    each: small enough that the temporaries stay in cache and are reused by the allocator
    (2M-value chunks measured 5-20x slower on a busy 2-core machine).
    """
    xp = array_module(qt.data)
    x = xp.asarray(x, dtype=xp.float32)
    rows, cols = qt.shape
    if x.ndim not in (1, 2) or x.shape[-1] != cols:
        raise ValueError(f"quant_matmul: x of shape {tuple(x.shape)} does not match weight shape {qt.shape} (needs [..., {cols}])")
    x2 = x.reshape(-1, cols)                                        # [n, in]
    if fast and xp is np:
        from .kernels import qmatvec                                # lazy: the kernels import this module
        if qmatvec.supports(qt):
            y = qmatvec.qmatmul(x2, qt)                             # [n, out]
            return y.reshape(rows) if x.ndim == 1 else y
    out = xp.empty((x2.shape[0], rows), dtype=xp.float32)          # [n, out]
    chunked_matmul(x2, lambda r0, r1: dequantize(qt.data[r0:r1], qt.qtype, (r1 - r0, cols)), rows, out,
                   chunk_values)
    return out.reshape(rows) if x.ndim == 1 else out


def chunked_matmul(x2, weight_rows, rows: int, out, chunk_values: int = 1 << 16):
    """out [n, rows] = x2 [n, cols] @ W.T, W's output rows taken about `chunk_values` values at a
    time from weight_rows(r0, r1) -> float32 [r1 - r0, cols]. The one summation order of
    quant_matmul's reference path, which the strict CUDA twin shares bit for bit."""
    cols = x2.shape[1]
    step = max(1, chunk_values // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out[:, r0:r1] = x2 @ weight_rows(r0, r1).T                # [n, in] @ [in, chunk]


def release_raw(qt: QuantTensor) -> bool:
    """Drop the pages of `qt.data` from this process's memory when they are a read-only file mapping.

    For a weight that `kernels.qmatvec.prepare` has repacked, the raw GGML blocks are only read
    again by fallbacks (and by `rows`): the pages go back to the page cache and come back on the
    next touch (madvise MADV_DONTNEED on an np.memmap opened with mode "r"; nothing else is
    touched, since dropping anonymous or copy-on-write pages would lose data). The bytes stop
    being counted by the allocator that placed them. -> True when pages were released.
    """
    import mmap
    obj, mm = qt.data, None
    while obj is not None:                                          # find the memmap under the views
        if isinstance(obj, np.memmap):
            mm = obj._mmap if obj.mode == "r" else None
            break
        obj = getattr(obj, "base", None)
    if mm is None or not hasattr(mm, "madvise") or array_module(qt.data) is not np:
        return False
    base = np.frombuffer(mm, np.uint8).ctypes.data                  # start of the mapping
    off, n = qt.data.ctypes.data - base, int(qt.data.nbytes)
    if off < 0 or off + n > len(mm) or not qt.data.flags.c_contiguous:
        return False
    start = off - off % mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, off + n - start)
    src = getattr(qt, "source", None)
    if src is not None:
        from .memory import get_allocator
        try:
            get_allocator().free(src)                               # no longer resident
        except ValueError:                                          # not a placed array, or freed already
            pass
    return True


def concat_rows(*qts: QuantTensor) -> QuantTensor:
    """Stack weights of one qtype and width into one [sum of rows, cols] QuantTensor (a copy).

    Fusing q|k|v or gate|up this way turns three (two) decode mat-vecs into one call. The parts'
    pages are dropped afterwards where they are a read-only file mapping (`release_raw`): the
    parts are usually let go once fused, and their mapping would otherwise stay resident.
    """
    if not qts:
        raise ValueError("concat_rows needs at least one QuantTensor")
    q, cols = qts[0].qtype, qts[0].shape[1]
    for t in qts[1:]:
        if t.qtype != q or t.shape[1] != cols:
            raise ValueError(f"concat_rows: {t.qtype.name} {t.shape} does not stack under {q.name} {qts[0].shape}")
    xp = array_module(qts[0].data)
    data = xp.concatenate([t.data for t in qts], axis=0)
    for t in qts:
        release_raw(t)
    return QuantTensor(data, q, (int(data.shape[0]), cols))
