"""Quantized products on the CPU in numba: a fused mat-vec for decode, dequantized tiles for prefill.

    y = qmatvec(x, qt)     # x [in] or [n, in] f32 (n small), qt QuantTensor [out, in] -> [out] / [n, out]
    y = qmatmul(x, qt)     # x [n, in], n large (a prompt): tile by tile, dequantize + BLAS GEMM

Prefill. A prompt of n tokens does 2 n FLOPs per weight, so there BLAS wins, and the cost to
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

    nibble types (Q4_0, Q4_1, Q4_K): qs u8 [ng, nb, 16, G], d, m [ng, nb, G]
        value = d * q + m per 32-value block (Q4_0: m = -8 d; Q4_K: one block per sub-block)
    Q5_0: qs u8 [ng, nb, 16, G], qh u8 [ng, nb, 4, G] (bit j = high bit of value j), d [ng, nb, G]
    Q8_0: qs i8 [ng, nb, 32, G], d [ng, nb, G]
    Q6_K: qs u8 [ng, nb, 16, G] low nibbles, qh u8 [ng, nb, 8, G] 2-bit highs, s f32 [ng, nb, 2, G]
        (one scale per 16 values: values 0..15 and 16..31 of each 32-block)

Byte j of a 32-value block holds value j in its low nibble and value j + 16 in its high one
(the Q4_0/Q4_1 order; Q4_K and Q6_K are reordered to it). Scales that GGML stores as
float16 stay float16 (as uint16 bits: numba has no float16 arrays; the kernel widens them),
so Q4_1, Q5_0 and Q8_0 repack to exactly their raw size, Q4_0 to 1.11x; the K-quants' scale
products d * sc become float32 (Q4_K 1.33x, Q6_K 1.2x). See `Packed.nbytes`.

Int8 activations (Q4_0, Q4_1, Q4_K, Q8_0; llama.cpp's Q8 idea). A decode step is a race
through ~100 MB of weights, and the float kernel above was compute-bound on unpacking nibbles
to floats (~4.6 GB/s). So for these types x is quantized per 32-value block to int8 (scale
dx = max|x| / 127, `quantize_x`), the weight bytes are stored as dwords of 4 consecutive values
of one row ([words, G, 4]), and a 64-byte load is 16 rows x 4 values: VPDPBUSD adds four u8 x s8
products per int32 lane (AVX512-VNNI; elsewhere LLVM lowers plain widening multiplies). Block
sums are exact integers; only the per-block scaling rounds. The result is dequant(W) @ q8(x)
(`reference`, to ~1e-7), ~5e-3 from the float32 product, as in llama.cpp; prefill rounds x the
same way. Q5_0 and Q6_K keep the float kernels (float32 sums in a fixed order, ~1e-6 of
`quant_matmul`). With a 2 KB software prefetch the int8 kernels stream ~8-10 GB/s on one core
here, the rate of a plain read loop.

numba is optional and imported on first use; without it (or for CuPy arrays, other quant
types or large batches) qmatvec falls back to `quants.quant_matmul`. Kernels are compiled
with cache=True, so only the first process on a machine pays the compile time.
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..device import array_module, num_threads
from ..quants import BLOCK_SIZES, QuantTensor, _k_scale_min, quant_matmul, release_raw

MAX_BATCH = 16        # above this many rows of x, dequantize-then-BLAS wins
FAST_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q8_0, QT.Q6_K)

prange = range        # replaced by numba.prange when the kernels are compiled
_JIT = None           # {name: compiled kernel} once numba is loaded; False if it is missing
vdot8_nib = vdot_q5_0 = vdot8_q8_0 = vdot_q6_k = None   # the numba intrinsics below, set by _jit()
deq_nib = deq_q4_0 = deq_q5_0 = deq_q8_0 = deq_q6_k = None


# ---------------------------------------------------------------------------- SIMD block dots (LLVM IR)
# numba's auto-vectorizer leaves these loops 2x short of what the CPU can do (it will not
# widen them past 8 lanes, and with fastmath=False it may not split a sum into several
# chains). So each 32-value block is written once as explicit 16-lane LLVM vector code,
# a numba intrinsic: lanes are 16 output rows, the 16 (or 32) byte rows of the block are
# unrolled, and the products go to 4 independent fused multiply-add chains, summed at the
# end in a fixed order. LLVM lowers <16 x float> to AVX-512, AVX2 or NEON as the CPU allows.

LANES = 16
_CHAINS = 4
# The int8 kernels ask for the weight bytes this far ahead of the ones they read: a token streams
# every weight from memory once, and the hardware prefetcher alone got ~5 GB/s of the ~9.7 GB/s a
# plain read loop gets on one core here; 2 KB ahead got ~8 GB/s (1, 2, 4, 8 KB tried).
PREFETCH_BYTES = 2048


def vnni() -> bool:
    """True when the host CPU has AVX512-VNNI (the int8 dots then compile to VPDPBUSD).
    SPARK_LAB_VNNI=0 forces the portable widening-multiply code (for tests and comparisons)."""
    import os
    if os.environ.get("SPARK_LAB_VNNI", "1") == "0":
        return False
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("avx512vnni", False))
    except Exception:                                                      # an llvmlite without the query
        return False


def _intrinsics():
    """Build the numba intrinsics (needs numba and llvmlite; called once by _jit)."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    L = LANES
    VNNI = vnni()
    AHEAD = PREFETCH_BYTES
    fv, iv, bv = ir.VectorType(ir.FloatType(), L), ir.VectorType(ir.IntType(32), L), ir.VectorType(ir.IntType(8), L)
    hv = ir.VectorType(ir.IntType(16), L)

    def const(v):
        return ir.Constant(iv, [v] * L)

    class Block:
        """Codegen helpers over the arrays handed to one intrinsic call."""

        def __init__(self, context, builder, sig, args):
            self.b, self.ctx, self.types = builder, context, sig.args
            self.ptr = [context.make_array(t)(context, builder, a).data if isinstance(t, types.Array) else None
                        for t, a in zip(sig.args, args)]
            self.fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fv, [fv] * 3), f"llvm.fma.v{L}f32")

        def at(self, ptr, off):
            return self.b.gep(ptr, [off])

        def bytes16(self, ptr, off, signed=False):  # 16 bytes -> <16 x i32>
            v = self.b.load(self.b.bitcast(self.at(ptr, off), bv.as_pointer()), align=1)
            return self.b.sext(v, iv) if signed else self.b.zext(v, iv)

        def floats16(self, i, off):  # 16 floats of array argument i: float32, or uint16 holding float16 bits
            if self.types[i].dtype == types.uint16:
                h = self.b.load(self.b.bitcast(self.at(self.ptr[i], off), hv.as_pointer()), align=1)
                return self.b.fpext(self.b.bitcast(h, ir.VectorType(ir.HalfType(), L)), fv)
            return self.b.load(self.b.bitcast(self.at(self.ptr[i], off), fv.as_pointer()), align=1)

        def splat(self, s):
            v = self.b.insert_element(ir.Constant(fv, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
            return self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), L), [0] * L))

        def x(self, xoff, k):  # splat of x[xoff + k]
            return self.splat(self.b.load(self.at(self.ptr[4], self.b.add(xoff, ir.Constant(xoff.type, k)))))

        def row(self, G, l0, j):  # offset of byte row j, lane l0, in a [rows, G] block
            return self.b.add(l0, self.b.mul(G, ir.Constant(G.type, j)))

        def dot(self, chains, k, codes, xv):
            c = self.b.uitofp(codes, fv) if codes.type == iv else codes
            chains[k] = self.b.call(self.fma, [c, xv, chains[k]])

        def total(self, chains):
            while len(chains) > 1:
                chains = [self.b.fadd(chains[i], chains[i + 1]) for i in range(0, len(chains), 2)]
            return chains[0]

        def update(self, i, l0, value):  # acc[l0:l0+16] += value, acc = float32 array argument i
            p = self.b.bitcast(self.at(self.ptr[i], l0), fv.as_pointer())
            self.b.store(self.b.fadd(self.b.load(p, align=1), value), p, align=1)

    def zeros(n):
        return [ir.Constant(fv, [0.0] * L) for _ in range(n)]

    # ---- int8 dots (nibble types and Q8_0): x arrives block-quantized to int8 (`quantize_x`),
    # and the weight bytes of a block are stored as dwords, 4 consecutive values of one row:
    # q u8 [words, G, 4]. One 64-byte load is 16 lanes (rows) x 4 values; `dot4` adds the four
    # u8 x s8 products of each dword to an int32 lane: one VPDPBUSD where the CPU has AVX512-VNNI,
    # else plain widening multiplies that LLVM lowers for the CPU at hand. Integer sums are exact,
    # so only the per-block float scaling rounds.
    b64, w64 = ir.VectorType(ir.IntType(8), L * 4), ir.VectorType(ir.IntType(16), L * 4)
    i32 = ir.IntType(32)

    def dot4(k, c, a, w):
        """c + per-lane sum of the 4 byte products u8 (a) x s8 (w); all <16 x i32>."""
        b = k.b
        if VNNI:
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(iv, [iv] * 3), "llvm.x86.avx512.vpdpbusd.512")
            return b.call(fn, [c, a, w])
        p = b.mul(b.zext(b.bitcast(a, b64), w64), b.sext(b.bitcast(w, b64), w64))          # <64 x i16>, no overflow
        for j in range(4):
            sel = b.shuffle_vector(p, p, ir.Constant(ir.VectorType(i32, L), list(range(j, 4 * L, 4))))
            c = b.add(c, b.sext(sel, iv))
        return c

    def words16(k, ptr, G, l0, t, ahead=0):  # <16 x i32>: dword row t of a [words, G, 4] block, lanes l0..l0+15
        off = k.b.mul(k.b.add(k.b.mul(G, ir.Constant(G.type, t)), l0), ir.Constant(G.type, 4))
        if ahead:
            prefetch(k, k.at(ptr, k.b.add(off, ir.Constant(G.type, ahead))))
        return k.b.load(k.b.bitcast(k.at(ptr, off), iv.as_pointer()), align=1)

    def prefetch(k, ptr):  # a read hint: the weights stream from memory once per token
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(k.b.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        k.b.call(fn, [k.b.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])

    def splat_int(k, v):  # <16 x i32> splat of an i32
        e = k.b.insert_element(ir.Constant(iv, ir.Undefined), v, ir.Constant(i32, 0))
        return k.b.shuffle_vector(e, e, ir.Constant(ir.VectorType(i32, L), [0] * L))

    def splat_word(k, ptr, off):  # <16 x i32> splat of the 4 bytes at ptr + off
        return splat_int(k, k.b.load(k.b.bitcast(k.at(ptr, off), i32.as_pointer()), align=1))

    def isum(k, chains):
        return k.b.add(k.b.add(chains[0], chains[1]), k.b.add(chains[2], chains[3]))

    # args: q [words, G, 4] bytes, G, l0, (extra arrays...), xq int8 [cols], xoff, ..., acc [G]
    @intrinsic
    def vdot8_nib(typingctx, q, G, l0, m, xq, xoff, d, xqs, dx, acc):
        """acc[l0:+16] += dx * (d * sum_j (lo_j xq_j + hi_j xq_16+j) + m * xqs)   (Q4_0, Q4_1, Q4_K)."""
        sig = types.void(q, G, l0, m, xq, xoff, d, xqs, dx, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            G_, l0_, xoff_, xqs_, dx_ = args[1], args[2], args[5], args[7], args[8]
            low = const(0x0F0F0F0F)
            ch = [ir.Constant(iv, [0] * L) for _ in range(4)]
            for t in range(4):                                   # dword t: values 4t..4t+3 and 16+4t..16+4t+3
                w = words16(k, k.ptr[0], G_, l0_, t, AHEAD)
                lo, hi = builder.and_(w, low), builder.and_(builder.lshr(w, const(4)), low)
                ch[t % 2] = dot4(k, ch[t % 2], lo, splat_word(k, k.ptr[4], builder.add(xoff_, ir.Constant(xoff_.type, 4 * t))))
                ch[2 + t % 2] = dot4(k, ch[2 + t % 2], hi, splat_word(k, k.ptr[4], builder.add(xoff_, ir.Constant(xoff_.type, 16 + 4 * t))))
            d_, m_ = k.floats16(6, l0_), k.floats16(3, l0_)
            s = builder.sitofp(isum(k, ch), fv)
            inner = builder.call(k.fma, [m_, k.splat(builder.sitofp(xqs_, ir.FloatType())), builder.fmul(d_, s)])
            k.update(9, l0_, builder.fmul(k.splat(dx_), inner))
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def vdot8_q8_0(typingctx, q, G, l0, xq, xoff, d, xqs, dx, acc):
        """acc[l0:+16] += dx * d * (sum_j u_j xq_j - 128 xqs), u = q + 128 stored as u8 [8, G, 4]."""
        sig = types.void(q, G, l0, xq, xoff, d, xqs, dx, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            G_, l0_, xoff_, xqs_, dx_ = args[1], args[2], args[4], args[6], args[7]
            ch = [ir.Constant(iv, [0] * L) for _ in range(4)]
            for t in range(8):
                w = words16(k, k.ptr[0], G_, l0_, t, AHEAD)
                ch[t % 4] = dot4(k, ch[t % 4], w, splat_word(k, k.ptr[3], builder.add(xoff_, ir.Constant(xoff_.type, 4 * t))))
            corr = builder.mul(builder.trunc(xqs_, i32) if xqs_.type != i32 else xqs_, ir.Constant(i32, 128))
            s = builder.sitofp(builder.sub(isum(k, ch), splat_int(k, corr)), fv)
            k.update(8, l0_, builder.fmul(k.splat(dx_), builder.fmul(k.floats16(5, l0_), s)))
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def vdot_q5_0(typingctx, q, G, l0, qh, x, xoff, d, xs, acc):
        """acc[l0:+16] += d * (sum_j q_j x_j - 16 xs), q_j = nibble | bit j of qh << 4."""
        sig = types.void(q, G, l0, qh, x, xoff, d, xs, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            G_, l0_, xoff_, xs_ = args[1], args[2], args[5], args[7]
            h = [k.bytes16(k.ptr[3], k.row(G_, l0_, r)) for r in range(4)]   # 4 bytes = 32 high bits per lane
            ch = zeros(_CHAINS)
            for j in range(16):
                v = k.bytes16(k.ptr[0], k.row(G_, l0_, j))
                for half, code in ((0, builder.and_(v, const(15))), (1, builder.lshr(v, const(4)))):
                    bit = builder.and_(builder.lshr(h[2 * half + (j >> 3)], const(j & 7)), const(1))
                    code = builder.or_(code, builder.shl(bit, const(4)))
                    k.dot(ch, (2 * j + half) % _CHAINS, code, k.x(xoff_, 16 * half + j))
            d_ = k.floats16(6, l0_)
            t = builder.fsub(k.total(ch), k.splat(builder.fmul(xs_, ir.Constant(ir.FloatType(), 16.0))))
            k.update(8, l0_, builder.fmul(d_, t))
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def vdot_q6_k(typingctx, q, G, l0, qh, x, xoff, s, xs0, xs1, acc):
        """acc[l0:+16] += s0 (sum_{j<16} q_j x_j - 32 xs0) + s1 (sum_{j>=16} q_j x_j - 32 xs1)."""
        sig = types.void(q, G, l0, qh, x, xoff, s, xs0, xs1, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            G_, l0_, xoff_, xs0_, xs1_ = args[1], args[2], args[5], args[7], args[8]
            h = [k.bytes16(k.ptr[3], k.row(G_, l0_, r)) for r in range(8)]   # 2-bit highs, 4 per byte
            lo, hi = zeros(_CHAINS // 2), zeros(_CHAINS // 2)
            for j in range(16):
                v = k.bytes16(k.ptr[0], k.row(G_, l0_, j))
                for half, code, ch in ((0, builder.and_(v, const(15)), lo), (1, builder.lshr(v, const(4)), hi)):
                    top = builder.and_(builder.lshr(h[j & 7], const(2 * (2 * half + (j >> 3)))), const(3))
                    k.dot(ch, j % len(ch), builder.or_(code, builder.shl(top, const(4))), k.x(xoff_, 16 * half + j))
            c32 = ir.Constant(ir.FloatType(), 32.0)
            t0 = builder.fsub(k.total(lo), k.splat(builder.fmul(xs0_, c32)))
            t1 = builder.fsub(k.total(hi), k.splat(builder.fmul(xs1_, c32)))
            s0, s1 = k.floats16(6, l0_), k.floats16(6, builder.add(l0_, G_))
            k.update(9, l0_, builder.call(k.fma, [s1, t1, builder.fmul(s0, t0)]))
            return context.get_dummy_value()
        return sig, codegen

    # ---- tile dequantizers: one 32-value block of 16 lanes (rows) -> tile[row0 + j, col:col+16], j < 32.
    # The float32 operations of quants.dequantize, in its order (a multiply, then an add: no FMA).
    # args: q [16 or 32, G] codes, G, l0, (extra arrays...), tile [cols, nc] f32, row0, col, nc

    class Tile(Block):
        def store(self, i, row, col, nc, value):  # tile[row, col:col+16] = value, tile = array argument i
            off = self.b.add(self.b.mul(row, nc), col)
            self.b.store(value, self.b.bitcast(self.at(self.ptr[i], off), fv.as_pointer()), align=1)

        def pair(self, i, row0, col, nc, j, lo, hi):  # values j and j + 16 of the block
            c = ir.Constant(row0.type, j)
            self.store(i, self.b.add(row0, c), col, nc, lo)
            self.store(i, self.b.add(row0, ir.Constant(row0.type, 16 + j)), col, nc, hi)

    def fconst(v):
        return ir.Constant(fv, [v] * L)

    def bytes_of_words(k, w, j):  # <16 x i32> of byte j (0..3) of each lane's dword w
        v = k.b.shuffle_vector(k.b.bitcast(w, b64), k.b.bitcast(w, b64), ir.Constant(ir.VectorType(i32, L), list(range(j, 4 * L, 4))))
        return k.b.zext(v, iv)

    def deq_nib_factory(sub8):
        @intrinsic
        def deq(typingctx, q, G, l0, d, m, tile, row0, col, nc):
            """Q4_0 (sub8): d * (q - 8); Q4_1, Q4_K: d * q + m.  q u8 [4, G, 4] dwords."""
            sig = types.void(q, G, l0, d, m, tile, row0, col, nc)

            def codegen(context, builder, sg, args):
                k = Tile(context, builder, sg, args)
                G_, l0_, row0_, col_, nc_ = args[1], args[2], args[6], args[7], args[8]
                d_, m_ = k.floats16(3, l0_), k.floats16(4, l0_)
                for t in range(4):
                    w = words16(k, k.ptr[0], G_, l0_, t)
                    for jj in range(4):
                        v = bytes_of_words(k, w, jj)
                        vals = []
                        for code in (builder.and_(v, const(15)), builder.lshr(v, const(4))):
                            f = builder.uitofp(code, fv)
                            vals.append(builder.fmul(d_, builder.fsub(f, fconst(8.0))) if sub8
                                        else builder.fadd(builder.fmul(d_, f), m_))
                        k.pair(5, row0_, col_, nc_, 4 * t + jj, *vals)
                return context.get_dummy_value()
            return sig, codegen
        return deq

    @intrinsic
    def deq_q5_0(typingctx, q, G, l0, qh, d, tile, row0, col, nc):
        """d * (q - 16), q = nibble | bit j of qh << 4."""
        sig = types.void(q, G, l0, qh, d, tile, row0, col, nc)

        def codegen(context, builder, sg, args):
            k = Tile(context, builder, sg, args)
            G_, l0_, row0_, col_, nc_ = args[1], args[2], args[6], args[7], args[8]
            h = [k.bytes16(k.ptr[3], k.row(G_, l0_, r)) for r in range(4)]
            d_ = k.floats16(4, l0_)
            for j in range(16):
                v = k.bytes16(k.ptr[0], k.row(G_, l0_, j))
                vals = []
                for half, code in ((0, builder.and_(v, const(15))), (1, builder.lshr(v, const(4)))):
                    bit = builder.and_(builder.lshr(h[2 * half + (j >> 3)], const(j & 7)), const(1))
                    f = builder.uitofp(builder.or_(code, builder.shl(bit, const(4))), fv)
                    vals.append(builder.fmul(d_, builder.fsub(f, fconst(16.0))))
                k.pair(5, row0_, col_, nc_, j, *vals)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def deq_q8_0(typingctx, q, G, l0, d, tile, row0, col, nc):
        """(u - 128) * d, u = q + 128 stored as u8 [8, G, 4] dwords."""
        sig = types.void(q, G, l0, d, tile, row0, col, nc)

        def codegen(context, builder, sg, args):
            k = Tile(context, builder, sg, args)
            G_, l0_, row0_, col_, nc_ = args[1], args[2], args[5], args[6], args[7]
            d_ = k.floats16(3, l0_)
            for t in range(8):
                w = words16(k, k.ptr[0], G_, l0_, t)
                for jj in range(4):
                    f = builder.sitofp(builder.sub(bytes_of_words(k, w, jj), const(128)), fv)
                    k.store(4, builder.add(row0_, ir.Constant(row0_.type, 4 * t + jj)), col_, nc_, builder.fmul(f, d_))
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def deq_q6_k(typingctx, q, G, l0, qh, s, tile, row0, col, nc):
        """s0 * (q - 32) for values 0..15, s1 * (q - 32) for 16..31; q = nibble | 2 high bits << 4."""
        sig = types.void(q, G, l0, qh, s, tile, row0, col, nc)

        def codegen(context, builder, sg, args):
            k = Tile(context, builder, sg, args)
            G_, l0_, row0_, col_, nc_ = args[1], args[2], args[6], args[7], args[8]
            h = [k.bytes16(k.ptr[3], k.row(G_, l0_, r)) for r in range(8)]
            sc = (k.floats16(4, l0_), k.floats16(4, builder.add(l0_, G_)))
            for j in range(16):
                v = k.bytes16(k.ptr[0], k.row(G_, l0_, j))
                vals = []
                for half, code in ((0, builder.and_(v, const(15))), (1, builder.lshr(v, const(4)))):
                    top = builder.and_(builder.lshr(h[j & 7], const(2 * (2 * half + (j >> 3)))), const(3))
                    q32 = builder.sub(builder.or_(code, builder.shl(top, const(4))), const(32))
                    vals.append(builder.fmul(sc[half], builder.sitofp(q32, fv)))
                k.pair(5, row0_, col_, nc_, j, *vals)
            return context.get_dummy_value()
        return sig, codegen

    deq_q4_0, deq_nib = deq_nib_factory(True), deq_nib_factory(False)
    return {"vdot8_nib": vdot8_nib, "vdot_q5_0": vdot_q5_0, "vdot8_q8_0": vdot8_q8_0, "vdot_q6_k": vdot_q6_k,
            "deq_nib": deq_nib, "deq_q4_0": deq_q4_0, "deq_q5_0": deq_q5_0, "deq_q8_0": deq_q8_0, "deq_q6_k": deq_q6_k}


# ---------------------------------------------------------------------------- kernels (numba source)
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
    n, cols = x.shape
    nb = cols // 32
    xq = np.empty((n, cols), np.int8)
    dx = np.empty((n, nb), np.float32)
    xqs = np.empty((n, nb), np.int32)
    for i in range(n):
        for b in range(nb):
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
    return xq, dx, xqs


INT8_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q8_0)   # their decode dots take x quantized to int8


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
    from ..quants import dequantize
    xq, dx, _ = quantize_q8(x2)
    xt = (xq.reshape(len(x2), -1, 32) * dx[..., None].astype(np.float64)).reshape(x2.shape)
    w = dequantize(np.asarray(qt.data), qt.qtype).reshape(qt.shape).astype(np.float64)
    return (xt @ w.T).astype(np.float32).reshape(*np.shape(x)[:-1], qt.shape[0])


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


def _k_q6_k(qs, qh, s, x, out):
    """qs u8 [ng, nb, 16, G]; qh u8 [ng, nb, 8, G]; s [ng, nb, 2, G]."""
    ng, nb, _, G = qs.shape
    xs = _block_sums(x, 16)                                                # [n, 2 * nb] half-block sums
    for g in prange(ng):
        acc = np.empty(G, np.float32)
        for i in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(nb):
                for l0 in range(0, G, LANES):
                    vdot_q6_k(qs[g, b], G, l0, qh[g, b], x[i], b * 32, s[g, b], xs[i, 2 * b], xs[i, 2 * b + 1], acc)
            _store(out, i, g * G, acc)


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


def _t_q6_k(qs, qh, s, g0, g1, tile):
    """qs u8 [ng, nb, 16, G]; qh u8 [ng, nb, 8, G]; s f32 [ng, nb, 2, G]."""
    _, nb, _, G = qs.shape
    nc = tile.shape[1]
    for g in prange(g0, g1):
        for b in range(nb):
            for l0 in range(0, G, LANES):
                deq_q6_k(qs[g, b], G, l0, qh[g, b], s[g, b], tile, b * 32, (g - g0) * G + l0, nc)


_SOURCES = {"nib": _k_nib, "q5_0": _k_q5_0, "q8_0": _k_q8_0, "q6_k": _k_q6_k,
            "t_nib": _t_nib, "t_q5_0": _t_q5_0, "t_q8_0": _t_q8_0, "t_q6_k": _t_q6_k}


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
        globals().update(_intrinsics())
        opts = dict(parallel=True, fastmath=False, cache=True, nogil=True)
        helpers = dict(fastmath=False, cache=True, nogil=True, inline="always")
        _rf16 = numba.njit(**helpers)(_round_f16)
        globals().update(_block_sums=numba.njit(**helpers)(_block_sums), _store=numba.njit(**helpers)(_store),
                         _round_f16=_rf16, quantize_x=numba.njit(**helpers)(quantize_x))
        # the tile dequantizers run on the calling thread: BLAS's threads do the prefill's parallel
        # part, and two thread pools handing the cores to each other were 2-5x slower on a busy box
        _JIT = {name: numba.njit(**dict(opts, parallel=not name.startswith("t_")))(f) for name, f in _SOURCES.items()}
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
    from ..memory import get_allocator
    alloc = get_allocator()
    if alloc.device.is_gpu:                                                # a CPU copy is not the GPU's memory
        return arrays
    return tuple(alloc.place(a, tag="weights", what=f"{what} (repacked)".strip()) for a in arrays)


def _repack(q, blocks, G):
    """GGML blocks u8 [rows, nb, type size] (rows a multiple of G) -> (kind, arrays)."""
    if q in (QT.Q4_0, QT.Q4_1):                                           # scales stay float16 (as uint16 bits)
        d = _h16(blocks[..., 0:2])
        m = (-8.0 * d.view(np.float16)).astype(np.float16).view(np.uint16) if q == QT.Q4_0 else _h16(blocks[..., 2:4])
        return "nib", (_words(blocks[..., 2 if q == QT.Q4_0 else 4:], G), _lanes(d, G), _lanes(m, G))
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
    if p is None or qt.qtype not in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
        return None
    ids = np.asarray(ids, np.int64).reshape(-1)
    g, l = ids // p.G, ids % p.G
    qs = p.arrays[0][g, :, :, l, :]                                        # [n, nb, words, 4]
    n, nb = qs.shape[:2]
    body = qs.reshape(n, nb, -1)
    if p.kind == "q8_0":
        body = body ^ np.uint8(128)
    heads = [p.arrays[1][g, :, l]]                                         # d [n, nb] float16 bits
    if qt.qtype == QT.Q4_1:
        heads.append(p.arrays[2][g, :, l])                                 # m
    parts = [h.astype(np.uint16).view(np.uint8).reshape(n, nb, 2) for h in heads] + [body]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


# ---------------------------------------------------------------------------- entry point

def qmatvec(x, qt: QuantTensor, out=None):
    """x @ dequant(qt).T for decode: x [in] or [n, in] f32 -> [out] or [n, out] f32.

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
    if n > MAX_BATCH:                                                      # prefill-sized: tiles + BLAS
        return qmatmul(x, qt, out=out)
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
    try:
        k[p.kind](*p.arrays, x2, out.reshape(n, rows))
    except _numba_error() as e:                                            # e.g. an LLVM without these vector ops
        warnings.warn(f"qmatvec: the numba {p.kind} kernel does not compile here ({type(e).__name__}); "
                      f"using quants.quant_matmul instead", RuntimeWarning, stacklevel=2)
        k[p.kind] = None
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
