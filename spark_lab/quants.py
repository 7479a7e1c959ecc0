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
from gguf import GGMLQuantizationType as QT

from .device import array_module

QK_K = 256  # super-block size of the K-quants

# qtype -> (values per block, bytes per block)
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


_DEQUANT = {
    QT.F32: _deq_f32, QT.F16: _deq_f16, QT.BF16: _deq_bf16,
    QT.Q4_0: _deq_q4_0, QT.Q4_1: _deq_q4_1, QT.Q5_0: _deq_q5_0, QT.Q5_1: _deq_q5_1,
    QT.Q8_0: _deq_q8_0, QT.Q2_K: _deq_q2_k, QT.Q3_K: _deq_q3_k, QT.Q4_K: _deq_q4_k,
    QT.Q5_K: _deq_q5_k, QT.Q6_K: _deq_q6_k, QT.Q8_K: _deq_q8_k,
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
        ids = xp.asarray(ids).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise ValueError(f"row ids must be in [0, {self.shape[0]}), got min {int(ids.min())} max {int(ids.max())}")
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
    step = max(1, chunk_values // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = dequantize(qt.data[r0:r1], qt.qtype, (r1 - r0, cols))  # [chunk, in]
        out[:, r0:r1] = x2 @ w.T
    return out.reshape(rows) if x.ndim == 1 else out


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
