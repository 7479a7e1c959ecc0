"""Repack GGML blocks once at load time into the kernels' row-interleaved layout (`prepare`,
`prepare_stack`), and rebuild raw blocks from it (`raw_rows`). The layouts are described in
the package docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ...ggml_types import GGMLQuantizationType as QT

from ...device import array_module
from ...quants import BLOCK_SIZES, QuantTensor, _k_scale_min, release_raw

FAST_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q8_0, QT.Q6_K, QT.MXFP4)


@dataclass
class Packed:
    """A QuantTensor repacked for the kernels: `arrays` in the kernel's argument order."""
    kind: str          # "nib", "q5_0", "q8_0", "q6_k" or "mxfp4"
    rows: int          # real output rows (the last group may be padded with zero rows)
    cols: int
    G: int             # rows per group (SIMD lanes)
    arrays: tuple
    stack: tuple | None = None   # `prepare_stack`: the stacked arrays this weight's are views of

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


def _f16(b):
    """uint8 [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _h16(b):
    """uint8 [..., 2] -> uint16 [...]: float16 bits, kept as they are (numba has no float16 arrays)."""
    return np.ascontiguousarray(b).view(np.uint16)[..., 0]


def _lanes(a, G):
    """[rows_padded, nb, ...] -> [ng, nb, ..., G]: G consecutive rows become the last axis."""
    ng = a.shape[0] // G
    a = a.reshape(ng, G, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _words(a, G):
    """[rows_padded, nb, 4 w] bytes -> [ng, nb, w, G, 4]: dword t of each row, G rows side by side."""
    ng, nb, nbytes = a.shape[0] // G, a.shape[1], a.shape[2]
    u = np.ascontiguousarray(a).view(np.uint32)                            # [rows, nb, w]: move dwords, not bytes
    out = np.ascontiguousarray(u.reshape(ng, G, nb, nbytes // 4).transpose(0, 2, 3, 1))
    return out.view(np.uint8).reshape(ng, nb, nbytes // 4, G, 4)


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


def _place(arrays, what: str):
    """Count the repacked arrays under "weights" in the CPU allocator (the views it returns are kept)."""
    from ...memory import get_allocator
    alloc = get_allocator()
    if alloc.device.is_gpu:                                                # a CPU copy is not the GPU's memory
        return arrays
    return tuple(alloc.place(a, tag="weights", what=f"{what} (repacked)".strip()) for a in arrays)


def _shuffle_q4_k(blocks, G, out):
    """Q4_K blocks u8 [R, ns, 144] (R a multiple of G) -> out u8 [R/G, ns*8, 4, G, 4]: each
    32-value sub-block's codes as paired nibbles (byte j = code j | code j+16 << 4), in dwords of
    4 bytes, G rows side by side (what _words(_pair_nibbles(codes)) gives, without temporaries)."""
    R, ns = blocks.shape[0], blocks.shape[1]
    for r in range(R):
        g, l = r // G, r % G
        for s in range(ns):
            for t in range(8):
                base, sh = 16 + 32 * (t // 2), (t % 2) * 4
                for j in range(16):
                    lo = (blocks[r, s, base + j] >> sh) & 15
                    hi = (blocks[r, s, base + j + 16] >> sh) & 15
                    out[g, s * 8 + t, j // 4, l, j % 4] = lo | (hi << 4)


def _shuffle_q6_k(blocks, G, qs, qh):
    """Q6_K blocks u8 [R, ns, 210] -> qs u8 [R/G, ns*8, 16, G] (low nibbles paired), qh u8
    [R/G, ns*8, 8, G] (2-bit highs of values j, j+8, j+16, j+24 in byte j)."""
    R, ns = blocks.shape[0], blocks.shape[1]
    lo = np.empty(256, np.uint8)                     # one super-block's codes, value order
    hi = np.empty(256, np.uint8)
    for r in range(R):
        g, l = r // G, r % G
        for s in range(ns):
            for h in range(2):                       # ql: values h*128 + k (low nibble), + 64 (high)
                for k in range(64):
                    byte = blocks[r, s, h * 64 + k]
                    lo[h * 128 + k] = byte & 15
                    lo[h * 128 + 64 + k] = byte >> 4
                for k in range(32):                  # qh: 2 bits of values h*128 + 32*i + k
                    byte = blocks[r, s, 128 + h * 32 + k]
                    for i in range(4):
                        hi[h * 128 + 32 * i + k] = (byte >> (2 * i)) & 3
            for t in range(8):
                o = 32 * t
                for j in range(16):
                    qs[g, s * 8 + t, j, l] = lo[o + j] | (lo[o + j + 16] << 4)
                for j in range(8):
                    qh[g, s * 8 + t, j, l] = (hi[o + j] | (hi[o + j + 8] << 2) | (hi[o + j + 16] << 4)
                                              | (hi[o + j + 24] << 6))


_SHUFFLE = None   # {name: numba-compiled shuffle}, False without numba


def _shuffles():
    global _SHUFFLE
    if _SHUFFLE is None:
        try:
            import numba
            jit = numba.njit(cache=True, nogil=True)
            _SHUFFLE = {"q4_k": jit(_shuffle_q4_k), "q6_k": jit(_shuffle_q6_k)}
        except ImportError:
            _SHUFFLE = False
    return _SHUFFLE


def _repack_k(q, blocks, G):
    """Q4_K / Q6_K through the numba byte shuffles (the scales in NumPy: 1/144 of the bytes);
    the same arrays as the NumPy path in `_repack`, ~10x faster (a model's load was ~35 s of it)."""
    sh = _shuffles()
    rows, ns, ts = blocks.shape
    b = blocks.reshape(rows * ns, ts)
    if q == QT.Q4_K:
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16], np)
        d32 = (d[:, None] * sc.astype(np.float32)).reshape(rows, ns * 8)
        m32 = -(dmin[:, None] * mn.astype(np.float32)).reshape(rows, ns * 8)
        qs = np.empty((rows // G, ns * 8, 4, G, 4), np.uint8)
        sh["q4_k"](blocks, G, qs)
        return "nib", (qs, _lanes(d32, G), _lanes(m32, G))
    d = _f16(b[:, 208:210])
    s = (d[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(rows, ns * 8, 2)
    qs = np.empty((rows // G, ns * 8, 16, G), np.uint8)
    qh = np.empty((rows // G, ns * 8, 8, G), np.uint8)
    sh["q6_k"](blocks, G, qs, qh)
    return "q6_k", (qs, qh, _lanes(s, G))


def _repack(q, blocks, G, fast: bool = True):
    """GGML blocks u8 [rows, nb, type size] (rows a multiple of G) -> (kind, arrays)."""
    if fast and q in (QT.Q4_K, QT.Q6_K) and _shuffles():
        return _repack_k(q, blocks, G)
    if q in (QT.Q4_0, QT.Q4_1):                                           # scales stay float16 (as uint16 bits)
        d = _h16(blocks[..., 0:2])
        m = (-8.0 * d.view(np.float16)).astype(np.float16).view(np.uint16) if q == QT.Q4_0 else _h16(blocks[..., 2:4])
        return "nib", (_words(blocks[..., 2 if q == QT.Q4_0 else 4:], G), _lanes(d, G), _lanes(m, G))
    if q == QT.MXFP4:                                                      # the E8M0 byte stays a byte
        return "mxfp4", (_words(blocks[..., 1:], G), _lanes(np.ascontiguousarray(blocks[..., 0]), G))
    if q == QT.Q4_K:
        codes, d, m = _unpack_q4_k(blocks)
        return "nib", (_words(_pair_nibbles(codes), G), _lanes(d, G), _lanes(m, G))
    if q == QT.Q5_0:
        return "q5_0", (_lanes(blocks[..., 6:], G), _lanes(blocks[..., 2:6], G), _lanes(_h16(blocks[..., 0:2]), G))
    if q == QT.Q8_0:
        w = _words(blocks[..., 2:], G)
        w ^= np.uint8(128)                                                 # int8 q -> u8 q + 128, in place
        return "q8_0", (w, _lanes(_h16(blocks[..., 0:2]), G))
    codes, s = _unpack_q6_k(blocks)                                        # Q6_K
    hi = codes >> 4                                                        # [rows, nb, 32] in 0..3
    qh = (hi[..., 0:8] | (hi[..., 8:16] << 2) | (hi[..., 16:24] << 4) | (hi[..., 24:32] << 6)).astype(np.uint8)
    return "q6_k", (_lanes(_pair_nibbles(codes & 15), G), _lanes(qh, G), _lanes(s, G))


# Rows repacked per step: the temporaries of a step stay a few MB, and with release the raw
# pages of each step are dropped as soon as they are repacked, so loading a model never holds
# a weight's raw and repacked copies whole at once (SmolLM2's 28 MB output matrix set the peak).
PREPARE_ROWS = 4096


def _repack_into(qt: QuantTensor, G: int, dst: list | None, g0: int, release: bool, ng_total: int | None = None):
    """Repack qt's rows PREPARE_ROWS at a time into dst[i][g0:g0 + its groups] (dst allocated
    here when None, with ng_total groups, default its own); each step's raw pages are dropped
    when `release`. -> (kind, dst)."""
    rows, cols = qt.shape
    bs, ts = BLOCK_SIZES[qt.qtype]
    raw = np.asarray(qt.data).reshape(rows, cols // bs, ts)
    ng = -(-rows // G)
    step = max(1, PREPARE_ROWS // G) * G
    kind = None
    for r0 in range(0, ng * G, step):
        r1 = min(r0 + step, ng * G)
        blocks = raw[r0:min(r1, rows)]
        if r1 > rows:                                                      # the last group's padding rows
            blocks = np.concatenate([blocks, np.zeros((r1 - rows, *blocks.shape[1:]), np.uint8)])
        kind, arrays = _repack(qt.qtype, blocks, G)
        if dst is None:
            dst = [np.empty((ng_total or ng, *a.shape[1:]), a.dtype) for a in arrays]
        for d, a in zip(dst, arrays):
            d[g0 + r0 // G:g0 + r1 // G] = a
        if release and qt.data.flags.c_contiguous:
            release_raw(QuantTensor(qt.data[r0:min(r1, rows)], qt.qtype, (min(r1, rows) - r0, cols)))
    return kind, dst


def prepare(qt: QuantTensor, G: int | None = None, release: bool = True, what: str = "") -> Packed | None:
    """Repack `qt` for the kernels once (stored on qt.packed); None for types they lack.

    The repacked arrays are counted by the allocator under "weights" (`what` names them).
    release: then drop the raw blocks' pages from memory (`quants.release_raw`; a read-only
    file mapping only), step by step: both the mat-vec and the prefill tiles read the repacked copy.
    """
    if qt.packed is not None and (G is None or qt.packed.G == G):
        return qt.packed
    if qt.qtype not in FAST_TYPES or array_module(qt.data) is not np:
        return None
    rows, cols = qt.shape
    G = G or _choose_group(rows)
    kind, arrays = _repack_into(qt, G, None, 0, release)
    qt.packed = Packed(kind, rows, cols, G, _place(tuple(arrays), what))
    if release:
        release_raw(qt)
    return qt.packed


def prepare_stack(qts, release: bool = True, what: str = "") -> tuple | None:
    """Repack weights of one type and width (q, k, v; gate, up) into ONE set of arrays, rows
    stacked in order, so that a single kernel call computes x @ [w1; w2; ...].T; each weight's
    `packed` holds views of its slice (prefill's tiles read them: nothing is stored twice).
    Written in place chunk by chunk (no second copy). -> the stacked arrays, or None when the
    weights do not qualify (mixed types or widths, already repacked, rows not a multiple of G)."""
    qts = list(qts)
    if len(qts) < 2 or not all(isinstance(q, QuantTensor) for q in qts):
        return None
    first = qts[0]
    if (first.qtype not in FAST_TYPES or any(q.packed is not None for q in qts)
            or any(q.qtype != first.qtype or q.shape[1] != first.shape[1] or array_module(q.data) is not np for q in qts)):
        return None
    G = _choose_group(sum(q.shape[0] for q in qts))
    if any(q.shape[0] % G for q in qts):                                   # padding rows would sit between the parts
        return None
    ng = [q.shape[0] // G for q in qts]
    dst, g0 = None, 0                                                      # allocated whole by the first part
    for q, n in zip(qts, ng):
        kind, dst = _repack_into(q, G, dst, g0, release, ng_total=sum(ng))
        g0 += n
    stacked = _place(tuple(dst), what)
    g0 = 0
    for q, n in zip(qts, ng):
        q.packed = Packed(kind, q.shape[0], q.shape[1], G, tuple(a[g0:g0 + n] for a in stacked), stack=stacked)
        if release:
            release_raw(q)
        g0 += n
    return stacked


def raw_rows(qt: QuantTensor, ids) -> np.ndarray | None:
    """The GGML blocks of rows `ids` u8 [n, row bytes], rebuilt from the repacked copy, or None
    (not repacked, or a type whose repack drops bytes: Q4_K, Q5_0, Q6_K). An embedding lookup
    reads these instead of the released raw pages: touching those would map them back in, with
    the kernel's fault-around neighbours (~12 MB of RSS for a prompt's rows)."""
    p = qt.packed
    if p is None or qt.qtype not in (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.MXFP4):
        return None
    ids = np.asarray(ids, np.int64).reshape(-1)
    g, l = ids // p.G, ids % p.G
    qs = p.arrays[0][g, :, :, l, :]                                        # [n, nb, words, 4]
    n, nb = qs.shape[:2]
    body = qs.reshape(n, nb, -1)
    if p.kind == "q8_0":
        body = body ^ np.uint8(128)
    if p.kind == "mxfp4":                                                  # the E8M0 byte, then the codes
        return np.concatenate([p.arrays[1][g, :, l].reshape(n, nb, 1), body], axis=-1).reshape(n, -1)
    heads = [p.arrays[1][g, :, l]]                                         # d [n, nb] float16 bits
    if qt.qtype == QT.Q4_1:
        heads.append(p.arrays[2][g, :, l])                                 # m
    parts = [h.astype(np.uint16).view(np.uint8).reshape(n, nb, 2) for h in heads] + [body]
    return np.concatenate(parts, axis=-1).reshape(n, -1)
