"""Repack GGML blocks once at load time into the kernels' row-interleaved layout (`prepare`,
`prepare_stack`), and rebuild raw blocks from it (`raw_rows`). The layouts are described in
the package docstring.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
from ...ggml_types import GGMLQuantizationType as QT

from ...device import array_module
from ...quants import BLOCK_SIZES, QuantTensor, release_raw
from .repack_cache import CacheEntry

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


def _q6_k_codes(b, rows, ns):
    """Q6_K blocks b u8 [rows * ns, 210] -> their 6-bit codes 0..63 [rows, ns*8, 32]."""
    ql, qh = b[:, 0:128], b[:, 128:192]
    lo = np.concatenate([ql.reshape(-1, 2, 1, 64) & 15, ql.reshape(-1, 2, 1, 64) >> 4], axis=2).reshape(-1, 8, 32)
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return (lo | (hi.reshape(-1, 8, 32) << 4)).reshape(rows, ns * 8, 32)


def _empty(shape, dtype) -> np.ndarray:
    """np.empty for the repacked arrays, with a large one's pages mapped in one call (MAP_POPULATE).
    Every byte is written next anyway; faulting the pages in one by one cost ~5 s per GB on a VM
    whose host backs guest memory lazily (0.5 s populated), and no more than this elsewhere."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n < POPULATE_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return np.empty(shape, dtype)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return np.frombuffer(m, dtype).reshape(shape)


POPULATE_BYTES = 1 << 20


def _choose_group(rows: int) -> int:
    return 64 if rows >= 1024 else 32


def _place(arrays, what: str):
    """Count the repacked arrays under "weights" in the CPU allocator (the views it returns are kept)."""
    from ...memory import get_allocator
    alloc = get_allocator()
    if alloc.device.is_gpu:                                                # a CPU copy is not the GPU's memory
        return arrays
    return tuple(alloc.place(a, tag="weights", what=f"{what} (repacked)".strip()) for a in arrays)


# ---------------------------------------------------------------------------- Q4_K / Q6_K at load (numba)
# The K-quant repack is a byte shuffle plus a scale decode, done by numba kernels that fill the
# destination arrays in place (no temporaries, no second copy): parallel over groups of G rows,
# each (group, super-block) step reads a ~9-13 KB input tile and writes a ~12 KB output tile
# (both stay in L1). Codes move as 32-bit words (4 values at a time, masks and shifts), the
# scales are decoded in the same pass. Rows past the end of `raw` (the last group's padding) are
# read as zero blocks, as the NumPy path pads them.

prange = range        # numba.prange once the kernels are compiled (`_shuffles`)
_LO, _HI, _B2 = 0x0F0F0F0F, 0xF0F0F0F0, 0x03030303     # per-byte masks of a 32-bit word


def _w16(u, e):
    """Bytes 2e..2e+3 of a row read as u16 [n] -> one little-endian 32-bit word."""
    return np.uint32(u[e]) | (np.uint32(u[e + 1]) << np.uint32(16))


def _pack_q4_k(raw, qs, scm, dd, dmn):
    """raw u32 [n, ns*36] rows of Q4_K blocks (n <= ng*G) -> qs u32 [ng, ns*8, 4, G] (word w of a
    32-value sub-block: bytes 4w..4w+3, byte j = code j | code j+16 << 4), scm u8 [ng, ns, 12, G]
    (the 12 bytes of packed 6-bit scales and mins of each super-block, as GGML stores them: the
    kernels unpack them in registers, simd.q4_k_scales16), dd, dmn u16 [ng, ns, G] (float16 bits of
    d and -dmin of each super-block: the kernels widen them and form d*sc and -dmin*mn, the float
    products `quants.dequantize` makes)."""
    n, ns = raw.shape[0], raw.shape[1] // 36
    ng, G = qs.shape[0], qs.shape[3]
    zero = np.zeros(raw.shape[1], np.uint32)
    for g in prange(ng):
        for s in range(ns):
            o, b8 = 36 * s, 8 * s
            for l in range(G):
                b = raw[g * G + l] if g * G + l < n else zero
                dd[g, s, l] = np.uint16(b[o] & 0xFFFF)
                dmn[g, s, l] = np.uint16((b[o] >> 16) ^ 0x8000)   # -x as a sign flip (a NaN keeps its sign)
                for w in range(3):                   # the packed 6-bit scales and mins, as they are
                    for k in range(4):
                        scm[g, s, 4 * w + k, l] = (b[o + 1 + w] >> 8 * k) & 255
                for p in range(4):                   # 32 code bytes: sub-block 2p in the low nibbles, 2p+1 high
                    for w in range(4):
                        x, y = b[o + 4 + 8 * p + w], b[o + 8 + 8 * p + w]
                        qs[g, b8 + 2 * p, w, l] = (x & _LO) | ((y & _LO) << 4)
                        qs[g, b8 + 2 * p + 1, w, l] = ((x >> 4) & _LO) | (y & _HI)


def _pack_q6_k(raw, qs, qh, sc, dd):
    """raw u16 [n, ns*105] rows of Q6_K blocks (n <= ng*G) -> qs u32 [ng, ns*8, 4, G] (low nibbles
    paired as in Q4_K: byte j of a sub-block = code j & 15 | (code j+16 & 15) << 4), qh u32
    [ng, ns*8, 2, G] (byte j < 8: the 2-bit highs of values j, j+16, j+8, j+24 in bits 0, 2, 4, 6,
    so word t % 2 shifted by 4 (t // 2) lines them up with nibble word t), sc i8 [ng, ns*8, 2, G]
    (the int8 scale of each 16 values), dd u16 [ng, ns, G] (float16 bits of d: the kernels widen it
    and form d * sc, the float product `quants.dequantize` makes)."""
    n, ns = raw.shape[0], raw.shape[1] // 105
    ng, G = qs.shape[0], qs.shape[3]
    zero = np.zeros(raw.shape[1], np.uint16)
    for g in prange(ng):
        for s in range(ns):
            o, b8 = 105 * s, 8 * s
            for l in range(G):
                u = raw[g * G + l] if g * G + l < n else zero
                dd[g, s, l] = u[o + 104]
                for k in range(8):
                    v = u[o + 96 + k]
                    sc[g, b8 + k, 0, l] = np.int8(v & 255)
                    sc[g, b8 + k, 1, l] = np.int8(v >> 8)
                for h in range(2):                   # values 128h + 32i + j: ql byte 64h + 32(i%2) + j, nibble i//2
                    for i in range(4):
                        lo = o + 32 * h + 16 * (i % 2)
                        for w in range(4):
                            x, y = _w16(u, lo + 2 * w), _w16(u, lo + 8 + 2 * w)
                            qs[g, b8 + 4 * h + i, w, l] = ((x & _LO) | ((y & _LO) << 4)) if i < 2 else (((x >> 4) & _LO) | (y & _HI))
                    for w in range(2):               # qh byte 32h + j, bits 2i..2i+1: value 32i + j
                        q0, q1 = _w16(u, o + 64 + 16 * h + 2 * w), _w16(u, o + 68 + 16 * h + 2 * w)
                        q2, q3 = _w16(u, o + 72 + 16 * h + 2 * w), _w16(u, o + 76 + 16 * h + 2 * w)
                        for i in range(4):
                            qh[g, b8 + 4 * h + i, w, l] = (((q0 >> 2 * i) & _B2) | (((q2 >> 2 * i) & _B2) << 2)
                                                          | (((q1 >> 2 * i) & _B2) << 4) | (((q3 >> 2 * i) & _B2) << 6))


_SHUFFLE = None   # {"q4_k", "q6_k": numba-compiled kernel}, False without numba


def _shuffles():
    global _SHUFFLE, _w16, prange
    if _SHUFFLE is None:
        try:
            import numba
        except ImportError:
            _SHUFFLE = False
            return _SHUFFLE
        prange = numba.prange
        _w16 = numba.njit(cache=True, nogil=True, inline="always")(getattr(_w16, "py_func", _w16))
        jit = numba.njit(cache=True, nogil=True, parallel=True)
        _SHUFFLE = {"q4_k": jit(_pack_q4_k), "q6_k": jit(_pack_q6_k)}
    return _SHUFFLE


def _k_shapes(q, rows: int, ns: int, G: int):
    """The repacked arrays' (shape, dtype) for `rows` rows of ns super-blocks (rows a multiple of G)."""
    ng, nb = rows // G, ns * 8
    if q == QT.Q4_K:
        return [((ng, nb, 4, G, 4), np.uint8), ((ng, ns, 12, G), np.uint8), ((ng, ns, G), np.uint16),
                ((ng, ns, G), np.uint16)]
    return [((ng, nb, 4, G, 4), np.uint8), ((ng, nb, 2, G, 4), np.uint8), ((ng, nb, 2, G), np.int8),
            ((ng, ns, G), np.uint16)]


def _pack_k(q, raw, out) -> None:
    """Q4_K / Q6_K rows raw u8 [n, row bytes] -> the repacked arrays `out` (their groups cover
    n rows; the rest are padding), through the numba kernels."""
    k, word = _shuffles(), (4 if q == QT.Q4_K else 2)
    if raw.ctypes.data % word or not raw.flags.c_contiguous:              # a GGUF aligns its tensors: rare
        raw = np.array(raw)
    raw = raw.view(np.uint32 if word == 4 else np.uint16)
    if q == QT.Q4_K:
        qs, scm, dd, dmn = out
        k["q4_k"](raw, qs.view(np.uint32).reshape(qs.shape[:4]), scm, dd, dmn)
    else:
        qs, qh, sc, dd = out
        k["q6_k"](raw, qs.view(np.uint32).reshape(qs.shape[:4]), qh.view(np.uint32).reshape(qh.shape[:4]), sc, dd)


def _repack_k(q, blocks, G):
    """Q4_K / Q6_K through the numba kernels: the same arrays as the NumPy path in `_repack`."""
    rows, ns, ts = blocks.shape
    out = [np.empty(shape, dt) for shape, dt in _k_shapes(q, rows, ns, G)]
    _pack_k(q, blocks.reshape(rows, ns * ts), out)
    return ("q4_k" if q == QT.Q4_K else "q6_k"), tuple(out)


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
    if q == QT.Q4_K:                                                      # scales stay packed (_pack_q4_k)
        rows, ns, _ = blocks.shape
        b = blocks.reshape(rows * ns, 144)
        d = _h16(b[:, 0:2]).reshape(rows, ns)
        dmn = (_h16(b[:, 2:4]) ^ np.uint16(0x8000)).reshape(rows, ns)
        qs = b[:, 16:].reshape(-1, 4, 1, 32)
        codes = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(rows, ns * 8, 32)
        return "q4_k", (_words(_pair_nibbles(codes), G), _lanes(b[:, 4:16].reshape(rows, ns, 12), G),
                        _lanes(d, G), _lanes(dmn, G))
    if q == QT.Q5_0:
        return "q5_0", (_lanes(blocks[..., 6:], G), _lanes(blocks[..., 2:6], G), _lanes(_h16(blocks[..., 0:2]), G))
    if q == QT.Q8_0:
        w = _words(blocks[..., 2:], G)
        w ^= np.uint8(128)                                                 # int8 q -> u8 q + 128, in place
        return "q8_0", (w, _lanes(_h16(blocks[..., 0:2]), G))
    rows, ns, _ = blocks.shape                                             # Q6_K: scales stay int8 (_pack_q6_k)
    b = blocks.reshape(rows * ns, 210)
    codes = _q6_k_codes(b, rows, ns)
    hi = codes >> 4                                                        # [rows, nb, 32] in 0..3
    qh = (hi[..., 0:8] | (hi[..., 16:24] << 2) | (hi[..., 8:16] << 4) | (hi[..., 24:32] << 6)).astype(np.uint8)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).reshape(rows, ns * 8, 2)
    d = _h16(b[:, 208:210]).reshape(rows, ns)
    return "q6_k", (_words(_pair_nibbles(codes & 15), G), _words(qh, G), _lanes(sc, G), _lanes(d, G))


# Rows repacked per step: the temporaries of a step stay a few MB, and with release the raw
# pages of each step are dropped as soon as they are repacked, so loading a model never holds
# a weight's raw and repacked copies whole at once (SmolLM2's 28 MB output matrix set the peak).
PREPARE_ROWS = 4096


def _alloc(specs, cache: CacheEntry | None = None) -> list:
    """Arrays of [(shape, dtype)]: in the cache entry's new file when there is one (and room), else memory."""
    arrays = cache.alloc(specs) if cache is not None else None
    return arrays if arrays is not None else [_empty(shape, dt) for shape, dt in specs]


def _repack_into(qt: QuantTensor, G: int, dst: list | None, g0: int, release: bool, ng_total: int | None = None,
                 cache: CacheEntry | None = None):
    """Repack qt's rows PREPARE_ROWS at a time into dst[i][g0:g0 + its groups] (dst allocated
    here when None, with ng_total groups, default its own, in `cache`'s file when given); each
    step's raw pages are dropped when `release`. -> (kind, dst)."""
    rows, cols = qt.shape
    bs, ts = BLOCK_SIZES[qt.qtype]
    raw = np.asarray(qt.data).reshape(rows, cols // bs, ts)
    ng = -(-rows // G)
    step = max(1, PREPARE_ROWS // G) * G
    kind = None
    direct = qt.qtype in (QT.Q4_K, QT.Q6_K) and _shuffles()              # the kernels write dst in place
    if direct:
        kind = "q4_k" if qt.qtype == QT.Q4_K else "q6_k"
        if dst is None:
            dst = _alloc(_k_shapes(qt.qtype, (ng_total or ng) * G, cols // bs, G), cache)
    for r0 in range(0, ng * G, step):
        r1 = min(r0 + step, ng * G)
        blocks = raw[r0:min(r1, rows)]
        if direct:                                                         # padding rows are read as zeros there
            _pack_k(qt.qtype, blocks.reshape(len(blocks), -1), [d[g0 + r0 // G:g0 + r1 // G] for d in dst])
        else:
            if r1 > rows:                                                  # the last group's padding rows
                blocks = np.concatenate([blocks, np.zeros((r1 - rows, *blocks.shape[1:]), np.uint8)])
            kind, arrays = _repack(qt.qtype, blocks, G)
            if dst is None:
                dst = _alloc([((ng_total or ng, *a.shape[1:]), a.dtype) for a in arrays], cache)
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
    cache = CacheEntry.of([qt], G)                                         # a big GGUF: the copy on disk
    hit = cache.load() if cache is not None else None
    if hit is not None:
        kind, arrays = hit
    else:
        kind, arrays = _repack_into(qt, G, None, 0, release, cache=cache)
        if cache is not None:
            cache.commit(kind)
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
    cache = CacheEntry.of(qts, G)
    hit = cache.load() if cache is not None else None
    if hit is not None:
        kind, dst = hit
    else:
        dst, g0 = None, 0                                                  # allocated whole by the first part
        for q, n in zip(qts, ng):
            kind, dst = _repack_into(q, G, dst, g0, release, ng_total=sum(ng), cache=cache)
            g0 += n
        if cache is not None:
            cache.commit(kind)
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
