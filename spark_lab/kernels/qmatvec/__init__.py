"""Quantized products on the CPU in numba: a fused mat-vec for decode, dequantized tiles for prefill.

    y = qmatvec(x, qt)     # x [in] or [n, in] f32 (n small), qt QuantTensor [out, in] -> [out] / [n, out]
    y = qmatmul(x, qt)     # x [n, in], n large (a prompt): the int8 GEMM, else dequantized tiles + BLAS
    y = qgemm(x, qt)       # the int8 GEMM alone (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, MXFP4), None where it does not apply

Int8 GEMM (prefill and batches of the int8 types with dword layouts: Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, MXFP4).
The decode dots extended over tokens: each thread takes a group of G weight rows (~200 KB of an
8B layer's Q4_K, so it stays in L2) and runs all n tokens through it, TOKENS (8) at a time, so a
weight dword is loaded and unpacked once per 8 tokens (`simd.vdot8_*_tokens`). Per token the
operations are those of the one-token dot, so row i is bit-identical to qmatvec(x[i]) for any n
and any batch-mates (batched decode relies on it); `qmatvec` uses it for n >= TOKENS. Measured on
one 8B layer's matrices, 512 tokens, 2 threads (benchmarks/qgemm.py, load average ~13): Q4_K
45-48 GFLOP/s vs 13-22 for tiles + BLAS (2.2-3.4x), Q8_0 56 vs 17; on a Zen 3 (AVX2, 128 tokens, one
thread) Q4_K ~130-150 vs ~78, Q6_K 109 vs 55. Q5_0 keeps the tiles + BLAS below (a batched decode
step runs its one-token dot per row).

Prefill of the other types (Q5_0; any type where the GEMM does not compile). A prompt of n tokens does 2 n FLOPs per weight, so there BLAS wins, and the cost to
beat is the float32 copy of the weight it needs. `qmatmul` dequantizes the repacked weight a
tile of output rows at a time (512 KB of float32 with one thread, so it is still in L2 when the
GEMM reads it; the whole weight with several, see TILE_BYTES) into a per-thread scratch buffer, with explicit 16-lane SIMD code (about 5 Gvalues/s on one
core, ~0.1 of the GEMM's time at n = 120), then BLAS multiplies x by it into its slice of y.
The tile is stored transposed, [in, rows], which is what the row-interleaved layout yields
with contiguous stores. Its values are bit-identical to `quants.dequantize`. Since the
prefill reads the repacked copy too, the raw GGML blocks are not needed after `prepare`: it
drops their pages when they are a read-only file mapping (`quants.release_raw`).

Why a repack. A decode step reads every weight once, so the mat-vec is a race through memory,
and NumPy's dequantize-then-BLAS pays for a float32 copy of each weight. The fused kernel
never writes that copy. `prepare(qt)` repacks the GGML blocks once at load time into a
row-interleaved layout: G output rows side by side, so byte j of a block is a vector of G
bytes, one per row. The inner loop then runs across rows (SIMD lanes) instead of along a
row, which needs no horizontal sum and no float reassociation: the kernels compile with
fastmath=False and every row's sum is taken in a fixed order.

    nibble types (Q4_0, Q4_1): qs u8 [ng, nb, 16, G], d, m [ng, nb, G]
        value = d * q + m per 32-value block (Q4_0: m = -8 d)
    Q4_K: qs as the nibble types (one block per 32-value sub-block), scm u8 [ng, nb/8, 12, G] (GGML's 12
        bytes of packed 6-bit scales and mins per super-block), dd, dmn u16 [ng, nb/8, G] (float16 bits of
        d, -dmin per super-block); the kernels unpack sc, mn and form d = dd * sc, m = dmn * mn per
        sub-block in registers (simd.q4_k_scales16, vdot8_q4_k) and run the nibble dot
    Q5_0: qs u8 [ng, nb, 16, G], qh u8 [ng, nb, 4, G] (bit j = high bit of value j), d [ng, nb, G]
    Q8_0: qs i8 [ng, nb, 32, G], d [ng, nb, G]
    Q6_K: qs u8 [ng, nb, 4, G, 4] low nibbles (the Q4_K dwords), qh u8 [ng, nb, 2, G, 4] 2-bit highs
        (dwords that a shift lines up with the nibble words), sc i8 [ng, nb, 2, G] (one scale per 16
        values: values 0..15 and 16..31 of each 32-block), dd u16 [ng, nb/8, G] (float16 bits): s = dd * sc
    MXFP4: qs u8 [ng, nb, 4, G, 4] E2M1 codes (nibble layout, dwords), e u8 [ng, nb, G] E8M0 scales

Byte j of a 32-value block holds value j in its low nibble and value j + 16 in its high one
(the Q4_0/Q4_1 order; Q4_K and Q6_K are reordered to it). Scales that GGML stores as
float16 stay float16 (as uint16 bits: numba has no float16 arrays; the kernel widens them),
so Q4_1, Q4_K, Q5_0, Q8_0, MXFP4 and Q6_K repack to exactly their raw size, Q4_0 to 1.11x. Decode
streams these arrays, so bytes are speed: Q4_K with float32 products per sub-block (1.33x) had
bound an 8B model's decode, float32 d and dmin per super-block still made it 1.06x, its scales and
mins a byte each 1.03x; kept packed as GGML stores them (unpacked in registers: three byte loads,
a few masks and shifts per 16 rows and sub-block), a 14336 x 4096 mat-vec reads 2.7% fewer bytes
and ran 1.01-1.03x as many per second (2 threads, alternating with the byte layout in one process).
See `Packed.nbytes`.

Int8 activations (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, MXFP4; llama.cpp's Q8 idea). A decode step is a race
through ~100 MB of weights, and the float kernel above was compute-bound on unpacking nibbles
to floats (~4.6 GB/s). So for these types x is quantized per 32-value block to int8 (scale
dx = max|x| / 127, `quantize_x`), the weight bytes are stored as dwords of 4 consecutive values
of one row ([words, G, 4]), and a 64-byte load is 16 rows x 4 values: VPDPBUSD adds four u8 x s8
products per int32 lane (AVX512-VNNI; with AVX2, VPMADDUBSW + VPMADDWD on 256-bit halves, int16 sums of
several blocks' bytes before each VPMADDWD (`simd.Sums`); elsewhere LLVM lowers plain widening multiplies). Block
sums are exact integers; only the per-block scaling rounds. The result is dequant(W) @ q8(x)
(`reference`, to ~1e-7), ~5e-3 from the float32 product, as in llama.cpp; prefill rounds x the
same way. MXFP4's E2M1 values doubled are integers (0, 1, 2, 3, 4, 6, 8, 12 and negatives):
its codes become 12 + that integer in registers (a few byte ops), dotted as unsigned bytes, and
12 sum(xq) and the halved scale 2^(e-128) are applied per block. Q6_K's 6-bit codes are put
together from a nibble dword and a shifted high-bits dword (u8 0..63), each 16-value half summed
on its own chain, 32 times the half's int8 sum of x taken off. Q5_0 keeps the float kernel (float32 sums in a fixed order, ~1e-6 of
`quant_matmul`). With a software prefetch 8 KB ahead into L2 the int8 kernels stream ~20 GB/s on one core
of a Zen 4 VM (a plain read loop: 25-30; 2 KB ahead into L1 got 12-18).

numba is optional and imported on first use; without it (or for CuPy arrays, other quant
types or large batches) qmatvec falls back to `quants.quant_matmul`. Kernels are compiled
with cache=True, so only the first process on a machine pays the compile time.

The parts: `simd.py` (the 16-lane block intrinsics, LLVM IR), `kernels.py` (the numba mat-vec
and tile sources), `q8.py` (int8 activations and `reference`), `repack.py` (`prepare`, the
layouts above), `experts.py` (`moe_matvec`: a token through the k experts its router picked);
this module compiles the kernels and holds the entry points.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
from ...ggml_types import GGMLQuantizationType as QT

from ...device import array_module, num_threads
from ...quants import QuantTensor, quant_matmul
from . import kernels, q8, simd
from .q8 import INT8_TYPES, _round_f16, quantize_q8, quantize_x, reference
from .experts import ExpertStack, moe_matvec, moe_matvec_pair
from .repack import FAST_TYPES, PREPARE_ROWS, Packed, prepare, prepare_stack, raw_rows
from .simd import LANES, PREFETCH_BYTES, vnni

__all__ = ["qmatvec", "qmatmul", "dequantize", "supports", "available", "prepare", "prepare_stack", "raw_rows",
           "moe_matvec", "moe_matvec_pair", "ExpertStack",
           "Packed", "quantize_x", "quantize_q8", "reference", "vnni", "FAST_TYPES", "INT8_TYPES", "MAX_BATCH",
           "PREPARE_ROWS", "LANES", "qgemm", "GEMM_KINDS", "PREFETCH_BYTES", "TILE_BYTES", "TILE_BYTES_THREADED", "_round_f16"]

MAX_BATCH = 16        # above this many rows of x, qmatmul is the faster call for the float-kernel types
                      # (Q5_0, Q6_K: tiles + BLAS); qmatvec stays row-invariant for any n

_JIT = None           # {name: compiled kernel} once numba is loaded; False if it is missing


def _jit():
    """Compile (or load from numba's cache) the kernels on first use; None without numba."""
    global _JIT, _round_f16, quantize_x
    if _JIT is None:
        try:
            import numba
        except ImportError:
            _JIT = False
            return None
        py = lambda f: getattr(f, "py_func", f)                            # noqa: E731  (the Python source)
        kernels.prange = numba.prange
        vars(kernels).update(simd.intrinsics())
        opts = dict(parallel=True, fastmath=False, cache=True, nogil=True)
        helpers = dict(fastmath=False, cache=True, nogil=True, inline="always")
        # numba resolves a kernel's globals when it compiles: each module gets the jitted helpers
        q8._round_f16 = _round_f16 = numba.njit(**helpers)(py(q8._round_f16))
        q8.quantize_row = kernels.quantize_row = numba.njit(**helpers)(py(q8.quantize_row))
        q8.x_buffers = kernels.x_buffers = numba.njit(**helpers)(py(q8.x_buffers))
        q8.quantize_x = kernels.quantize_x = quantize_x = numba.njit(**helpers)(py(q8.quantize_x))
        kernels._block_sums = numba.njit(**helpers)(py(kernels._block_sums))
        kernels._store = numba.njit(**helpers)(py(kernels._store))
        kernels._half_sums = numba.njit(**helpers)(py(kernels._half_sums))
        kernels._q4_k_scales = numba.njit(**helpers)(py(kernels._q4_k_scales))
        # the tile dequantizers run on the calling thread: BLAS's threads do the prefill's parallel
        # part, and two thread pools handing the cores to each other were 2-5x slower on a busy box
        _JIT = {name: numba.njit(**dict(opts, parallel=not name.startswith("t_")))(f)
                for name, f in kernels.SOURCES.items()}
    return _JIT or None


def available() -> bool:
    """True when numba is importable (the fused kernels can run)."""
    return _jit() is not None


# ---------------------------------------------------------------------------- entry point

def kernel_name(k: dict, kind: str, n: int) -> str:
    """The compiled kernel for n rows of x: the int8 GEMM ("m_" + kind) for n >= TOKENS where the
    type has one, else the one-token kernel run per row (each row gets the same numbers either way)."""
    return "m_" + kind if n >= simd.TOKENS and k.get("m_" + kind) is not None else kind


def qmatvec(x, qt: QuantTensor, out=None):
    """x @ dequant(qt).T for decode: x [in] or [n, in] f32 -> [out] or [n, out] f32.

    Row i of the result is bit-identical to qmatvec(x[i]) for every n (batched decode relies on
    it): n >= TOKENS runs the int8 GEMM where the type has one, else the one-token kernel per row.

    out: optional preallocated float32 result (C-contiguous, the result's shape).
    """
    rows, cols = qt.shape
    if type(x) is not np.ndarray or x.dtype != np.float32:
        x = np.asarray(x, dtype=np.float32) if array_module(x) is np else x
    if x.ndim not in (1, 2) or x.shape[-1] != cols:
        raise ValueError(f"qmatvec: x of shape {tuple(x.shape)} does not match weight shape {qt.shape} (needs [..., {cols}])")
    want = (rows,) if x.ndim == 1 else (x.shape[0], rows)
    if out is not None and (out.shape != want or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"qmatvec: out must be float32 C-contiguous of shape {want}, got {out.dtype} {tuple(out.shape)}")
    x2 = x.reshape(-1, cols)                                               # [n, in]
    n = x2.shape[0]
    k = _jit() if type(x2) is np.ndarray else None
    p = (qt.packed or prepare(qt)) if k else None
    if p is not None and k.get(p.kind) is None:                            # this kernel failed to compile here
        p = None
    if p is None:                                                          # fallback: chunked dequantize + BLAS
        y = quant_matmul(x2, qt, fast=False).reshape(want)
        if out is None:
            return y
        out[...] = y
        return out
    if not x2.flags.c_contiguous:
        x2 = np.ascontiguousarray(x2)
    if out is None:
        out = np.empty(want, np.float32)
    name = kernel_name(k, p.kind, n)
    try:
        k[name](*p.arrays, x2, out.reshape(n, rows))
    except _numba_error() as e:                                            # e.g. an LLVM without these vector ops
        warnings.warn(f"qmatvec: the numba {name} kernel does not compile here ({type(e).__name__}); "
                      f"using quants.quant_matmul instead", RuntimeWarning, stacklevel=2)
        k[name] = None
        out.reshape(n, rows)[...] = quant_matmul(x2, qt, fast=False)
    return out


# ---------------------------------------------------------------------------- prefill entry point

# float32 tile per step. One thread: 512 KB, still in L2 when the GEMM reads it (measured best of
# 256 KB..8 MB: 8 MB tiles cost 30% more). Several BLAS threads: the whole weight up to 16 MB, one
# GEMM call per weight, because each threaded BLAS call pays a hand-off between threads (on a
# busy 2-core box 512 KB tiles made a layer 6x slower than 8 MB ones; one call matched BLAS on
# a float32 weight).
TILE_BYTES = 1 << 19
TILE_BYTES_THREADED = 1 << 24
_scratch = threading.local()


def supports(qt: QuantTensor) -> bool:
    """True when `qmatmul` runs its numba path for `qt` (numba present, NumPy data, a repackable type)."""
    return qt.qtype in FAST_TYPES and array_module(qt.data) is np and _jit() is not None


def _tile_args(qt: QuantTensor, p: Packed):
    """The tile kernel for `p` and its leading arguments."""
    if p.kind == "nib":
        return "t_nib", (*p.arrays, qt.qtype == QT.Q4_0)
    return "t_" + p.kind, p.arrays


def _tile_buffer(n: int):
    """A float32 scratch of at least n values, one per thread, reused across calls."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(n, np.float32)
    return buf


def _tiles(qt: QuantTensor, tile_bytes: int):
    """Yield (r0, r1, tile): tile f32 [cols, r1 - r0] = dequant(qt)[r0:r1].T, tile by tile.

    None when the numba path is not available for qt. The tile is a view of a per-thread scratch
    buffer, overwritten by the next step."""
    k = _jit() if qt.qtype in FAST_TYPES and array_module(qt.data) is np else None
    p = (qt.packed or prepare(qt)) if k else None
    if p is None:
        return None
    name, args = _tile_args(qt, p)
    if k.get(name) is None:                                                # failed to compile here before
        return None
    rows, cols, G = p.rows, p.cols, p.G
    ng = -(-rows // G)
    step = max(1, tile_bytes // (4 * cols * G))                            # groups per tile
    buf = _tile_buffer(cols * min(step, ng) * G)

    def gen():
        for g0 in range(0, ng, step):
            g1 = min(ng, g0 + step)
            tile = buf[:cols * (g1 - g0) * G].reshape(cols, (g1 - g0) * G)
            k[name](*args, g0, g1, tile)
            r0, r1 = g0 * G, min(rows, g1 * G)
            yield r0, r1, tile[:, :r1 - r0]
    return gen()


def qmatmul(x, qt: QuantTensor, out=None, tile_bytes: int | None = None):
    """x @ dequant(qt).T for prefill: x [n, in] or [in] f32 -> [n, out] or [out] f32.

    For INT8_TYPES, x is first rounded to int8 blocks as the decode kernels see it (`reference`),
    so a prompt's tokens get the numbers they would get one by one (to float32 rounding).

    The repacked weight is dequantized a tile of output rows at a time (numba, bit-identical to
    `quants.dequantize`) into a cache-sized float32 scratch, and BLAS multiplies each tile into
    its slice of `out`. The float32 weight never exists whole (beyond 16 MB with several threads).
    Falls back to the NumPy `quants.quant_matmul` where numba or a kernel for the type is missing.
    tile_bytes: default TILE_BYTES with one thread (`device.num_threads()`), else TILE_BYTES_THREADED.
    """
    rows, cols = qt.shape
    if type(x) is not np.ndarray or x.dtype != np.float32:
        x = np.asarray(x, dtype=np.float32) if array_module(x) is np else x
    if x.ndim not in (1, 2) or x.shape[-1] != cols:
        raise ValueError(f"qmatmul: x of shape {tuple(x.shape)} does not match weight shape {qt.shape} (needs [..., {cols}])")
    want = (rows,) if x.ndim == 1 else (x.shape[0], rows)
    if out is not None and (out.shape != want or out.dtype != np.float32):
        raise ValueError(f"qmatmul: out must be float32 of shape {want}, got {out.dtype} {tuple(out.shape)}")
    x2 = x.reshape(-1, cols)                                               # [n, in]
    o2 = (np.empty(want, np.float32) if out is None else out).reshape(-1, rows)   # [n, out]
    if qt.qtype in INT8_TYPES and type(x2) is np.ndarray and o2.flags.c_contiguous and \
            qgemm(x2, qt, out=o2) is not None:                             # the int8 GEMM: faster than tiles + BLAS
        return o2.reshape(want) if out is None else out
    if tile_bytes is None:
        tile_bytes = TILE_BYTES if num_threads() == 1 else TILE_BYTES_THREADED
    tiles = _tiles(qt, tile_bytes) if type(x2) is np.ndarray else None
    if tiles is None:
        o2[...] = quant_matmul(x2, qt, fast=False)
        return o2.reshape(want) if out is None else out
    xr = x2
    if qt.qtype in INT8_TYPES:                                             # the decode kernels' int8 x, as floats:
        xq, dx, _ = quantize_x(np.ascontiguousarray(x2))                   # a token gets the same numbers whether
        xr = (xq.reshape(len(xq), -1, 32) * dx[..., None]).reshape(x2.shape)   # it is in a prompt or decoded alone
    try:
        for r0, r1, tile in tiles:
            np.matmul(xr, tile, out=o2[:, r0:r1])                          # [n, in] @ [in, r1-r0]
    except _numba_error() as e:
        warnings.warn(f"qmatmul: the numba {qt.qtype.name} tile kernel does not compile here ({type(e).__name__}); "
                      f"using quants.quant_matmul instead", RuntimeWarning, stacklevel=2)
        _jit()[_tile_args(qt, qt.packed)[0]] = None
        o2[...] = quant_matmul(x2, qt, fast=False)
    return o2.reshape(want) if out is None else out


GEMM_KINDS = ("nib", "q4_k", "q8_0", "q6_k", "mxfp4")   # Packed kinds with an int8 GEMM (`qgemm`)


def row_exact(qt: QuantTensor) -> bool:
    """True when any number of rows of x gives each row the numbers of that row alone: the
    weight's type has the int8 GEMM (`qgemm`, used for many rows) besides the per-row mat-vec;
    not the types whose many-row products go through dequantized tiles and BLAS."""
    k = _jit()
    p = (qt.packed or prepare(qt)) if k and qt.qtype in FAST_TYPES and array_module(qt.data) is np else None
    return p is not None and p.kind in GEMM_KINDS and k.get("m_" + p.kind) is not None and k.get(p.kind) is not None


def qgemm(x, qt: QuantTensor, out=None):
    """x @ dequant(qt).T through the int8 GEMM: x [n, in] f32 -> [n, out] f32, or None where it does
    not apply (no numba, a type without one, CuPy data). Row i is bit-identical to qmatvec(x[i])."""
    k = _jit() if type(x) is np.ndarray else None
    p = (qt.packed or prepare(qt)) if k and qt.qtype in FAST_TYPES and array_module(qt.data) is np else None
    if p is None or p.kind not in GEMM_KINDS or k.get("m_" + p.kind) is None:
        return None
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, qt.shape[1])
    if out is None:
        out = np.empty((len(x2), qt.shape[0]), np.float32)
    try:
        k["m_" + p.kind](*p.arrays, x2, out.reshape(len(x2), qt.shape[0]))
    except _numba_error() as e:
        warnings.warn(f"qgemm: the numba {p.kind} GEMM does not compile here ({type(e).__name__})", RuntimeWarning, stacklevel=2)
        k["m_" + p.kind] = None
        return None
    return out


def dequantize(qt: QuantTensor):
    """float32 [rows, cols] from the repacked weight through the numba tile kernels (for tests and
    tools; bit-identical to `quants.dequantize`), or None where that path is not available."""
    rows, cols = qt.shape
    tiles = _tiles(qt, TILE_BYTES)
    if tiles is None:
        return None
    w = np.empty((rows, cols), np.float32)
    for r0, r1, tile in tiles:
        w[r0:r1] = tile.T
    return w


def _numba_error():
    from numba.core.errors import NumbaError
    return NumbaError
