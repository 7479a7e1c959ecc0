"""The 16-lane block dots and tile dequantizers of the quantized kernels, as numba intrinsics
written in LLVM IR (`intrinsics()` builds them; `kernels.py` calls them).

Lanes are 16 output rows of a row-interleaved weight (`repack.py`); each intrinsic handles one
32-value block of those 16 rows. An edit here recompiles the kernels that use it (numba's cache
entries are keyed on kernels.py and the modules it imports: `numba_cache.source_stamp`).
"""
from __future__ import annotations
# ---------------------------------------------------------------------------- SIMD block dots (LLVM IR)
# numba's auto-vectorizer leaves these loops 2x short of what the CPU can do (it will not
# widen them past 8 lanes, and with fastmath=False it may not split a sum into several
# chains). So each 32-value block is written once as explicit 16-lane LLVM vector code,
# a numba intrinsic: lanes are 16 output rows, the 16 (or 32) byte rows of the block are
# unrolled, and the products go to 4 independent fused multiply-add chains, summed at the
# end in a fixed order. LLVM lowers <16 x float> to AVX-512, AVX2 or NEON as the CPU allows.

LANES = 16
_CHAINS = 4
# The int8 kernels ask for the weight bytes this far ahead of the ones they read, into L2
# (PREFETCHT1): a token streams every weight from memory once, and the hardware prefetcher alone
# falls short. On a Zen 4 VM whose core reads ~25-30 GB/s, 2 threads, real 8B shapes: none 15-17
# GB/s per matrix, 2 KB ahead into L1 (PREFETCHT0, the old setting, tuned on a ~10 GB/s core)
# 22-26, 4-8 KB into L2 26-38 (16 KB: 24-27). One core alone: 2 KB into L1 12-18, 8 KB into L2 20-22.
PREFETCH_BYTES = 8192
# rows of x (tokens) per multi-token dot: each weight dword loaded serves this many (4 x 4 int32
# chains of sums live in registers)
TOKENS = 8


def _cpu_has(feature: str) -> bool:
    import os
    if os.environ.get("SPARK_LAB_VNNI", "1") == "0":
        return False
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get(feature, False))
    except Exception:                                                      # an llvmlite without the query
        return False


def vnni() -> bool:
    """True when the host CPU has AVX512-VNNI (the int8 dots then compile to VPDPBUSD).
    SPARK_LAB_VNNI=0 forces the portable widening-multiply code (for tests and comparisons)."""
    return _cpu_has("avx512vnni")


def avx2() -> bool:
    """True when the host CPU has AVX2 (and no AVX512-VNNI is needed for it): the int8 dots then
    compile to VPMADDUBSW + VPMADDWD on 256-bit halves, the table look-ups to VPSHUFB.
    SPARK_LAB_VNNI=0 turns it off too."""
    return _cpu_has("avx2")


def byte_table() -> bool:
    """True when the host CPU has AVX512-BW: MXFP4's 16-entry code table is then one VPSHUFB per
    64 codes (else a few portable byte ops). SPARK_LAB_VNNI=0 turns it off too."""
    return _cpu_has("avx512bw")


def dot4(builder, c, a, w, with_vnni: bool):
    """LLVM IR: c + the per-lane sum of the 4 byte products u8 (a) x s8 (w), all <16 x i32>: one
    VPDPBUSD with_vnni, else widening multiplies that LLVM lowers for the CPU at hand (the int8
    mat-vecs here and the q8_0 key tiles of attn_blocks)."""
    from llvmlite import ir
    from numba.core import cgutils
    iv = ir.VectorType(ir.IntType(32), LANES)
    if with_vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(iv, [iv] * 3), "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [c, a, w])
    b64, w64 = ir.VectorType(ir.IntType(8), 4 * LANES), ir.VectorType(ir.IntType(16), 4 * LANES)
    p = builder.mul(builder.zext(builder.bitcast(a, b64), w64), builder.sext(builder.bitcast(w, b64), w64))   # no overflow
    for j in range(4):
        sel = builder.shuffle_vector(p, p, ir.Constant(iv, list(range(j, 4 * LANES, 4))))
        c = builder.add(c, builder.sext(sel, iv))
    return c


def intrinsics():
    """Build the numba intrinsics (needs numba and llvmlite; called once by `_jit`)."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    L = LANES
    VNNI, PSHUFB, AVX2 = vnni(), byte_table(), avx2()
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

    b32, h16, i8v = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16), ir.VectorType(i32, 8)

    def x86(k, name, ret, *args):
        fn = cgutils.get_or_insert_function(k.b.module, ir.FunctionType(ret, [a.type for a in args]), name)
        return k.b.call(fn, list(args))

    def halves(k, v):  # <64 x i8> -> its two <32 x i8> halves (the 256-bit registers of AVX2)
        return [k.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 32), list(range(h, h + 32)))) for h in (0, 32)]

    def joined(k, lo, hi):  # two <n x T> -> <2n x T>
        n = lo.type.count
        return k.b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 2 * n), list(range(2 * n))))

    class Sums:
        """n integer sums of dword products at once (one per token, or per half-block): add(j, a, w)
        adds to sum j the 4 products u8 (a) x s8 (w) of each lane's dword; total(j) -> <16 x i32>.

        bound: the largest byte of a (15 for nibbles, 24 for MXFP4's biased codes, 63 for Q6_K), or
        None for Q8_0's q + 128 bytes. VNNI (or the portable code): each add is one VPDPBUSD into
        `chains` round-robin chains per sum. AVX2: each add is VPMADDUBSW on the two 256-bit halves
        (byte pairs to int16), and up to 32767 // (2 * 127 * bound) of them are summed in int16
        before one VPMADDWD takes the int16 pairs to int32 (8 adds per VPMADDWD for nibbles: it
        cannot overflow, x being -127..127). Q8_0 there takes |q| and x with q's sign, one add per
        VPMADDWD, and its sums lack the 128 sum(x) of the other paths (Q8_BIAS). Integer sums are
        exact, so every path gives the same numbers."""

        def __init__(self, k, n, bound, chains=4):
            self.k, self.bound = k, bound
            self.run = 1 if bound is None else max(1, 32767 // (2 * 127 * bound))
            self.ch = [[ir.Constant(iv, [0] * L) for _ in range(chains)] for _ in range(n)]
            self.count = [0] * n
            self.pend = [None] * n          # AVX2: int16 partial sums (two <16 x i16> halves) and their count
            self.npend = [0] * n

        def _chain(self, j, f):  # the next chain of sum j (round-robin) <- f(that chain)
            c = self.count[j] % len(self.ch[j])
            self.ch[j][c] = f(self.ch[j][c])
            self.count[j] += 1

        def add(self, j, a, w):
            k, b = self.k, self.k.b
            if VNNI or not AVX2:
                self._chain(j, lambda c: dot4(k.b, c, a, w, VNNI))
                return
            pairs = []
            for ah, wh in zip(halves(k, b.bitcast(a, b64)), halves(k, b.bitcast(w, b64))):
                if self.bound is None:                                      # q = u - 128: |q| and x * sign(q)
                    q = b.xor(ah, ir.Constant(b32, [0x80] * 32))
                    ah = x86(k, "llvm.abs.v32i8", b32, q, ir.Constant(ir.IntType(1), 0))
                    wh = x86(k, "llvm.x86.avx2.psign.b", b32, wh, q)
                pairs.append(x86(k, "llvm.x86.avx2.pmadd.ub.sw", h16, ah, wh))
            old = self.pend[j]
            self.pend[j] = pairs if old is None else [b.add(o, p) for o, p in zip(old, pairs)]
            self.npend[j] += 1
            if self.npend[j] == self.run:
                self._flush(j)

        def _flush(self, j):
            if self.pend[j] is not None:
                ones = ir.Constant(h16, [1] * 16)
                v = joined(self.k, *(x86(self.k, "llvm.x86.avx2.pmadd.wd", i8v, h, ones) for h in self.pend[j]))
                self._chain(j, lambda c: self.k.b.add(c, v))
                self.pend[j], self.npend[j] = None, 0

        def total(self, j):
            self._flush(j)
            ch = self.ch[j][:max(1, min(self.count[j], len(self.ch[j])))]
            while len(ch) > 1:
                ch = [self.k.b.add(ch[i], ch[i + 1]) if i + 1 < len(ch) else ch[i] for i in range(0, len(ch), 2)]
            return ch[0]

    Q8_BIAS = 0 if AVX2 and not VNNI else 128      # what Q8_0's dots take off per unit of sum(x)

    def words16(k, ptr, G, l0, t, ahead=0):  # <16 x i32>: dword row t of a [words, G, 4] block, lanes l0..l0+15
        off = k.b.mul(k.b.add(k.b.mul(G, ir.Constant(G.type, t)), l0), ir.Constant(G.type, 4))
        if ahead:
            prefetch(k, k.at(ptr, k.b.add(off, ir.Constant(G.type, ahead))))
        return k.b.load(k.b.bitcast(k.at(ptr, off), iv.as_pointer()), align=1)

    def prefetch(k, ptr):  # a read hint into L2 (locality 2): the weights stream from memory once per token
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(k.b.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        k.b.call(fn, [k.b.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])

    def splat_int(k, v):  # <16 x i32> splat of an i32
        e = k.b.insert_element(ir.Constant(iv, ir.Undefined), v, ir.Constant(i32, 0))
        return k.b.shuffle_vector(e, e, ir.Constant(ir.VectorType(i32, L), [0] * L))

    def less(k, total, xs, c):  # <16 x float>: total - c * xs, xs an integer sum of x (any int width)
        xs = k.b.trunc(xs, i32) if xs.type != i32 else xs
        return k.b.sitofp(k.b.sub(total, splat_int(k, k.b.mul(xs, ir.Constant(i32, c)))), fv)

    def splat_word(k, ptr, off):  # <16 x i32> splat of the 4 bytes at ptr + off
        return splat_int(k, k.b.load(k.b.bitcast(k.at(ptr, off), i32.as_pointer()), align=1))

    def nibble_sums(k, sums, G_, l0_, xq, xoffs, codes=None):
        """sums[u] += the nibble block k.ptr[0] (lanes l0..l0+15) dotted with token u's int8 x at
        xoffs[u] of array argument xq: dword t holds values 4t..4t+3 (low nibbles) and 16+4t..16+4t+3
        (high); codes, if given, maps the nibble bytes first (MXFP4's E2M1 table). Every sum takes
        its products in one order (t, then low before high), whatever the token count."""
        b = k.b
        low = const(0x0F0F0F0F)
        for t in range(4):
            w = words16(k, k.ptr[0], G_, l0_, t, AHEAD)
            for half, c in ((0, b.and_(w, low)), (1, b.and_(b.lshr(w, const(4)), low))):
                if codes is not None:
                    c = b.bitcast(codes(k, b.bitcast(c, b64), b64), iv)
                for u, xoff in enumerate(xoffs):
                    sums.add(u, c, splat_word(k, k.ptr[xq], b.add(xoff, ir.Constant(xoff.type, 16 * half + 4 * t))))

    def nib_dot(k, G_, l0_, xq, xoff_, xqs_, dx_, d_, m_, acc, acc_off):
        """acc[acc_off:+16] += dx * (d * sum_j (lo_j xq_j + hi_j xq_16+j) + m * xqs): lanes l0..l0+15
        of the nibble block k.ptr[0]; xq, acc: argument numbers; d_, m_ <16 x float> scales."""
        b = k.b
        sums = Sums(k, 1, 15)
        nibble_sums(k, sums, G_, l0_, xq, [xoff_])
        s = b.sitofp(sums.total(0), fv)
        inner = b.call(k.fma, [m_, k.splat(b.sitofp(xqs_, ir.FloatType())), b.fmul(d_, s)])
        k.update(acc, acc_off, b.fmul(k.splat(dx_), inner))

    def q4_k_scales16(k, scm, j_, G_, dd, dmn, l0_):
        """<16 x float> d * sc and dmin-products * mn of sub-block j (0..7) of a super-block, lanes
        l0..l0+15 (argument scm: u8 [12, G], the super-block's packed 6-bit scales and mins, byte r
        of each row in row r; dd, dmn: f16 bits [G]): the float32 products of `quants.dequantize`.
        GGML's packing: for j < 4, sc = B[j] & 63, mn = B[j+4] & 63; else sc = B[j+4] & 15 | B[j-4] >> 6 << 4
        and mn = B[j+4] >> 4 | B[j] >> 6 << 4. Three byte rows are loaded (B[j+4], B[j & 3], B[j]) and
        both forms selected on j."""
        b = k.b
        row = lambda r: k.bytes16(k.ptr[scm], b.add(b.mul(r, G_), l0_))   # noqa: E731
        c_ = lambda v: ir.Constant(j_.type, v)                             # noqa: E731
        P, A, C = row(b.add(j_, c_(4))), row(b.and_(j_, c_(3))), row(j_)
        low = b.icmp_signed("<", j_, c_(4))
        hi2 = lambda x: b.shl(b.lshr(x, const(6)), const(4))               # noqa: E731
        sc = b.select(low, b.and_(A, const(63)), b.or_(b.and_(P, const(15)), hi2(A)))
        mn = b.select(low, b.and_(P, const(63)), b.or_(b.lshr(P, const(4)), hi2(C)))
        return (b.fmul(k.floats16(dd, l0_), b.uitofp(sc, fv)),
                b.fmul(k.floats16(dmn, l0_), b.uitofp(mn, fv)))

    # args: q [words, G, 4] bytes, G, l0, (extra arrays...), xq int8 [cols], xoff, ..., acc [G]
    @intrinsic
    def vdot8_nib(typingctx, q, G, l0, m, xq, xoff, d, xqs, dx, acc):
        """acc[l0:+16] += dx * (d * sum_j (lo_j xq_j + hi_j xq_16+j) + m * xqs)   (Q4_0, Q4_1, Q4_K)."""
        sig = types.void(q, G, l0, m, xq, xoff, d, xqs, dx, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            l0_ = args[2]
            nib_dot(k, args[1], l0_, 4, args[5], args[7], args[8], k.floats16(6, l0_), k.floats16(3, l0_), 9, l0_)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def vdot8_q4_k(typingctx, q, G, l0, scm, j, dd, dmn, xq, xoff, xqs, dx, acc):
        """vdot8_nib with Q4_K's scales formed from their packed bytes in registers (d * sc,
        dmin-products * mn of 16 lanes, sub-block j of the super-block whose scm, dd, dmn are given):
        a decode step reads the 6-bit scales once and writes no scratch."""
        sig = types.void(q, G, l0, scm, j, dd, dmn, xq, xoff, xqs, dx, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            l0_ = args[2]
            d_, m_ = q4_k_scales16(k, 3, args[4], args[1], 5, 6, l0_)
            nib_dot(k, args[1], l0_, 7, args[8], args[9], args[10], d_, m_, 11, l0_)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def q4_k_scales(typingctx, scm, j, G, dd, dmn, l0, dv, mv):
        """dv[l0:+16], mv[l0:+16] = d * sc, dmin-products * mn of sub-block j (the scratch of the GEMM
        and tiles)."""
        sig = types.void(scm, j, G, dd, dmn, l0, dv, mv)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            l0_ = args[5]
            for i, v in zip((6, 7), q4_k_scales16(k, 0, args[1], args[2], 3, 4, l0_)):
                builder.store(v, builder.bitcast(k.at(k.ptr[i], l0_), fv.as_pointer()), align=1)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def vdot8_q8_0(typingctx, q, G, l0, xq, xoff, d, xqs, dx, acc):
        """acc[l0:+16] += dx * d * (sum_j u_j xq_j - 128 xqs), u = q + 128 stored as u8 [8, G, 4]."""
        sig = types.void(q, G, l0, xq, xoff, d, xqs, dx, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            G_, l0_, xoff_, xqs_, dx_ = args[1], args[2], args[4], args[6], args[7]
            sums = Sums(k, 1, None)
            for t in range(8):
                w = words16(k, k.ptr[0], G_, l0_, t, AHEAD)
                sums.add(0, w, splat_word(k, k.ptr[3], builder.add(xoff_, ir.Constant(xoff_.type, 4 * t))))
            s = less(k, sums.total(0), xqs_, Q8_BIAS)
            k.update(8, l0_, builder.fmul(k.splat(dx_), builder.fmul(k.floats16(5, l0_), s)))
            return context.get_dummy_value()
        return sig, codegen

    # ---- the same dots for TOKENS rows of x at once (prefill, batched decode): each weight dword is
    # loaded and unpacked once and dotted with every token's x, so a weight read from cache serves
    # TOKENS tokens. Per token the operations are exactly those of the one-token dot above (integer
    # block sums are exact; the float scaling is the same ops in the same order), so a token's
    # result does not depend on which other tokens share the call: bit-identical, row invariant.
    # They prefetch the weights as the one-token dots do: a batched decode step reads every weight
    # once from L3/memory, not from L2 (SmolLM2, 8 rows, 2 threads: step 16.0 -> 13.2 ms).
    # args: q, G, l0, m, d, xq int8 [n, cols], xo (= i0 cols + b 32), xqs int32 [n, nb],
    #       dx f32 [n, nb], so (= i0 nb + b), cols, nb, acc f32 [TOKENS, G]

    def token_args(k, args, u):
        """x offset, xqs and dx of token u of the call (as IR values)."""
        b = k.b
        xo_, so_, cols_, nb_ = args[6], args[9], args[10], args[11]
        xoff = b.add(xo_, b.mul(cols_, ir.Constant(cols_.type, u)))
        soff = b.add(so_, b.mul(nb_, ir.Constant(nb_.type, u)))
        return xoff, b.load(k.at(k.ptr[7], soff)), b.load(k.at(k.ptr[8], soff))

    def acc_at(k, args, u):
        G_, l0_ = args[1], args[2]
        return k.b.add(l0_, k.b.mul(G_, ir.Constant(G_.type, u)))

    def vdot8_nib_tokens(T):
        @intrinsic
        def vdot(typingctx, q, G, l0, m, d, xq, xo, xqs, dx, so, cols, nb, acc):
            """vdot8_nib for T tokens: acc[u, l0:+16] += dx_u (d sum_u + m xqs_u)."""
            sig = types.void(q, G, l0, m, d, xq, xo, xqs, dx, so, cols, nb, acc)

            def codegen(context, builder, sg, args):
                k = Block(context, builder, sg, args)
                G_, l0_ = args[1], args[2]
                tok = [token_args(k, args, u) for u in range(T)]
                sums = Sums(k, T, 15, 4 if T <= 4 else 2)                   # 16 int32 chains in all
                nibble_sums(k, sums, G_, l0_, 5, [x[0] for x in tok])
                d_, m_ = k.floats16(4, l0_), k.floats16(3, l0_)
                for u in range(T):
                    _, xqs_, dx_ = tok[u]
                    s = builder.sitofp(sums.total(u), fv)
                    inner = builder.call(k.fma, [m_, k.splat(builder.sitofp(xqs_, ir.FloatType())), builder.fmul(d_, s)])
                    k.update(12, acc_at(k, args, u), builder.fmul(k.splat(dx_), inner))
                return context.get_dummy_value()
            return sig, codegen
        return vdot

    def vdot8_q8_0_tokens(T):
        @intrinsic
        def vdot(typingctx, q, G, l0, m, d, xq, xo, xqs, dx, so, cols, nb, acc):
            """vdot8_q8_0 for T tokens (m is unused, for a common signature)."""
            sig = types.void(q, G, l0, m, d, xq, xo, xqs, dx, so, cols, nb, acc)

            def codegen(context, builder, sg, args):
                k = Block(context, builder, sg, args)
                G_, l0_ = args[1], args[2]
                tok = [token_args(k, args, u) for u in range(T)]
                sums = Sums(k, T, None, 4 if T <= 4 else 2)
                for t in range(8):
                    w = words16(k, k.ptr[0], G_, l0_, t, AHEAD)
                    for u in range(T):
                        xoff = tok[u][0]
                        sums.add(u, w, splat_word(k, k.ptr[5], builder.add(xoff, ir.Constant(xoff.type, 4 * t))))
                d_ = k.floats16(4, l0_)
                for u in range(T):
                    _, xqs_, dx_ = tok[u]
                    s = less(k, sums.total(u), xqs_, Q8_BIAS)
                    k.update(12, acc_at(k, args, u), builder.fmul(k.splat(dx_), builder.fmul(d_, s)))
                return context.get_dummy_value()
            return sig, codegen
        return vdot

    # ---- MXFP4: 4-bit E2M1 codes in the nibble layout, their values doubled are the integers
    # {0, 1, 2, 3, 4, 6, 8, 12} and negatives, so the int8 dots above apply once a code is turned
    # into 12 + its doubled value (0..24, a u8 for VPDPBUSD; 12 xqs comes off the sum afterwards).
    # Plain vector integer ops, so LLVM lowers them for any CPU (AVX-512, AVX2, NEON).

    E2M1_BIASED = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0]    # 12 + doubled value, by code

    def e2m1_biased(k, c, vt):
        """Codes 0..15 in the elements of vector type vt (bytes or i32) -> 12 + 2 * E2M1 value."""
        b, n, w = k.b, vt.count, vt.element
        if PSHUFB and vt == b64:                                        # a table look-up per 16-byte lane
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(b64, [b64, b64]), "llvm.x86.avx512.pshuf.b.512")
            return b.call(fn, [ir.Constant(b64, [ir.Constant(w, v) for v in E2M1_BIASED * 4]), c])
        if AVX2 and vt == b64:                                          # the same per 16 bytes of each half
            table = ir.Constant(b32, [ir.Constant(w, v) for v in E2M1_BIASED * 2])
            return joined(k, *(x86(k, "llvm.x86.avx2.pshuf.b", b32, table, h) for h in halves(k, c)))
        c_ = lambda v: ir.Constant(vt, [ir.Constant(w, v)] * n)          # noqa: E731
        m = b.and_(c, c_(7))                                            # magnitude code: 0 1 2 3 4 5 6 7
        over = b.select(b.icmp_unsigned(">", m, c_(4)), b.sub(m, c_(4)), c_(0))
        top = b.select(b.icmp_unsigned("==", m, c_(7)), c_(2), c_(0))
        v = b.add(b.add(m, over), top)                                  # doubled:       0 1 2 3 4 6 8 12
        neg = b.icmp_unsigned("!=", b.and_(c, c_(8)), c_(0))
        return b.select(neg, b.sub(c_(12), v), b.add(c_(12), v))

    def e8m0_half(k, ptr, l0):
        """<16 x float>: 2^(e - 128) of the 16 scale bytes at ptr + l0 (the E8M0 scale, halved)."""
        b = k.b
        e = k.bytes16(ptr, l0)
        sub = b.shl(const(0x00200000), e)                               # e = 0, 1: float32 subnormals
        norm = b.shl(b.sub(e, const(1)), const(23))
        return b.bitcast(b.select(b.icmp_unsigned("<", e, const(2)), sub, norm), fv)

    @intrinsic
    def vdot8_mxfp4(typingctx, q, G, l0, xq, xoff, e, xqs, dx, acc):
        """acc[l0:+16] += dx * 2^(e-128) * (sum_j u_j xq_j - 12 xqs), u = 12 + doubled E2M1 value."""
        sig = types.void(q, G, l0, xq, xoff, e, xqs, dx, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            G_, l0_, xoff_, xqs_, dx_ = args[1], args[2], args[4], args[6], args[7]
            sums = Sums(k, 1, 24)
            nibble_sums(k, sums, G_, l0_, 3, [xoff_], e2m1_biased)
            s = less(k, sums.total(0), xqs_, 12)
            k.update(8, l0_, builder.fmul(k.splat(dx_), builder.fmul(e8m0_half(k, k.ptr[5], l0_), s)))
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

    def q6_k_codes(k, q, qh, G_, l0_, t, ahead=0):
        """The 6-bit codes of nibble word t of a Q6_K sub-block (repack._pack_q6_k), lanes l0..l0+15,
        as dwords of u8: (values 4t..4t+3, values 16+4t..16+4t+3)."""
        b = k.b
        w = words16(k, k.ptr[q], G_, l0_, t, ahead)
        h = b.lshr(words16(k, k.ptr[qh], G_, l0_, t % 2, ahead if t < 2 else 0), const(4 * (t // 2)))
        low, two = const(0x0F0F0F0F), const(0x03030303)
        lo = b.or_(b.and_(w, low), b.shl(b.and_(h, two), const(4)))
        hi = b.or_(b.and_(b.lshr(w, const(4)), low), b.shl(b.and_(b.lshr(h, const(2)), two), const(4)))
        return lo, hi

    def q6_k_scales16(k, sc, d, G_, l0_):
        """<16 x float> d * sc of the two 16-value halves, lanes l0..l0+15 (sc i8 [2, G], d f32 [G])."""
        b = k.b
        dv = k.floats16(d, l0_)
        return [b.fmul(dv, b.sitofp(k.bytes16(k.ptr[sc], off, signed=True), fv)) for off in (l0_, b.add(l0_, G_))]

    @intrinsic
    def vdot8_q6_k(typingctx, q, G, l0, qh, sc, d, xq, xoff, xh0, xh1, dx, acc):
        """acc[l0:+16] += dx * (s0 (sum_{j<16} q_j xq_j - 32 xh0) + s1 (sum_{j>=16} q_j xq_j - 32 xh1)),
        q_j the 6-bit codes (u8 for VPDPBUSD), s = d * sc, xh the int8 x sums of each half."""
        sig = types.void(q, G, l0, qh, sc, d, xq, xoff, xh0, xh1, dx, acc)

        def codegen(context, builder, sg, args):
            k = Block(context, builder, sg, args)
            G_, l0_, xoff_, dx_ = args[1], args[2], args[7], args[10]
            sums = Sums(k, 2, 63, 2)                             # the two 16-value halves, 2 chains each
            for t in range(4):
                lo, hi = q6_k_codes(k, 0, 3, G_, l0_, t, AHEAD)
                sums.add(0, lo, splat_word(k, k.ptr[6], builder.add(xoff_, ir.Constant(xoff_.type, 4 * t))))
                sums.add(1, hi, splat_word(k, k.ptr[6], builder.add(xoff_, ir.Constant(xoff_.type, 16 + 4 * t))))
            t0, t1 = [less(k, sums.total(h), x, 32) for h, x in ((0, args[8]), (1, args[9]))]
            s0, s1 = q6_k_scales16(k, 4, 5, G_, l0_)
            k.update(11, l0_, builder.fmul(k.splat(dx_), builder.call(k.fma, [s1, t1, builder.fmul(s0, t0)])))
            return context.get_dummy_value()
        return sig, codegen

    # ---- Q6_K and MXFP4 for TOKENS rows of x (their int8 GEMMs): per token the operations of
    # vdot8_q6_k / vdot8_mxfp4 above, in their order, so a row is bit-identical to its mat-vec.

    def vdot8_q6_k_tokens(T):
        @intrinsic
        def vdot(typingctx, q, G, l0, qh, sc, d, xq, xo, xh, dx, so, cols, nb, acc):
            """vdot8_q6_k for T tokens: xh int32 [n, cols/16] the int8 x sums of each half-block,
            xo = i0 cols + b 32, so = i0 nb + b, acc f32 [T, G]."""
            sig = types.void(q, G, l0, qh, sc, d, xq, xo, xh, dx, so, cols, nb, acc)

            def codegen(context, builder, sg, args):
                k = Block(context, builder, sg, args)
                G_, l0_, xo_, so_, cols_, nb_ = args[1], args[2], args[7], args[10], args[11], args[12]
                n_ = lambda v, ty: ir.Constant(ty, v)                       # noqa: E731
                xoffs = [builder.add(xo_, builder.mul(cols_, n_(u, cols_.type))) for u in range(T)]
                sums = Sums(k, 2 * T, 63, 2 if T <= 4 else 1)
                for t in range(4):
                    lo, hi = q6_k_codes(k, 0, 3, G_, l0_, t, AHEAD)
                    for u in range(T):
                        sums.add(2 * u, lo, splat_word(k, k.ptr[6], builder.add(xoffs[u], n_(4 * t, xo_.type))))
                        sums.add(2 * u + 1, hi, splat_word(k, k.ptr[6], builder.add(xoffs[u], n_(16 + 4 * t, xo_.type))))
                s0, s1 = q6_k_scales16(k, 4, 5, G_, l0_)
                for u in range(T):
                    soff = builder.add(so_, builder.mul(nb_, n_(u, nb_.type)))
                    h2 = builder.mul(soff, n_(2, soff.type))
                    t0, t1 = [less(k, sums.total(2 * u + h), builder.load(k.at(k.ptr[8], builder.add(h2, n_(h, h2.type)))), 32)
                              for h in (0, 1)]
                    dx_ = builder.load(k.at(k.ptr[9], soff))
                    k.update(13, acc_at(k, args, u), builder.fmul(k.splat(dx_), builder.call(k.fma, [s1, t1, builder.fmul(s0, t0)])))
                return context.get_dummy_value()
            return sig, codegen
        return vdot

    def vdot8_mxfp4_tokens(T):
        @intrinsic
        def vdot(typingctx, q, G, l0, m, e, xq, xo, xqs, dx, so, cols, nb, acc):
            """vdot8_mxfp4 for T tokens (m is unused, for the nibble kernels' signature; e the E8M0 bytes)."""
            sig = types.void(q, G, l0, m, e, xq, xo, xqs, dx, so, cols, nb, acc)

            def codegen(context, builder, sg, args):
                k = Block(context, builder, sg, args)
                G_, l0_ = args[1], args[2]
                tok = [token_args(k, args, u) for u in range(T)]
                sums = Sums(k, T, 24, 4 if T <= 4 else 2)
                nibble_sums(k, sums, G_, l0_, 5, [x[0] for x in tok], e2m1_biased)
                scale = e8m0_half(k, k.ptr[4], l0_)
                for u in range(T):
                    _, xqs_, dx_ = tok[u]
                    s = less(k, sums.total(u), xqs_, 12)
                    k.update(12, acc_at(k, args, u), builder.fmul(k.splat(dx_), builder.fmul(scale, s)))
                return context.get_dummy_value()
            return sig, codegen
        return vdot

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
    def deq_q6_k(typingctx, q, G, l0, qh, sc, d, tile, row0, col, nc):
        """s0 * (q - 32) for values 0..15, s1 * (q - 32) for 16..31; s = d * sc (repack._pack_q6_k)."""
        sig = types.void(q, G, l0, qh, sc, d, tile, row0, col, nc)

        def codegen(context, builder, sg, args):
            k = Tile(context, builder, sg, args)
            G_, l0_, row0_, col_, nc_ = args[1], args[2], args[7], args[8], args[9]
            s0, s1 = q6_k_scales16(k, 4, 5, G_, l0_)
            for t in range(4):
                lo, hi = q6_k_codes(k, 0, 3, G_, l0_, t)
                for jj in range(4):
                    vals = [builder.fmul(s_, builder.sitofp(builder.sub(bytes_of_words(k, w, jj), const(32)), fv))
                            for s_, w in ((s0, lo), (s1, hi))]
                    k.pair(6, row0_, col_, nc_, 4 * t + jj, *vals)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def deq_mxfp4(typingctx, q, G, l0, e, tile, row0, col, nc):
        """2^(e-128) * doubled E2M1 value; q u8 [4, G, 4] dwords of nibble codes."""
        sig = types.void(q, G, l0, e, tile, row0, col, nc)

        def codegen(context, builder, sg, args):
            k = Tile(context, builder, sg, args)
            G_, l0_, row0_, col_, nc_ = args[1], args[2], args[5], args[6], args[7]
            d_ = e8m0_half(k, k.ptr[3], l0_)
            for t in range(4):
                w = words16(k, k.ptr[0], G_, l0_, t)
                for jj in range(4):
                    v = bytes_of_words(k, w, jj)
                    vals = [builder.fmul(d_, builder.sitofp(builder.sub(e2m1_biased(k, code, iv), const(12)), fv))
                            for code in (builder.and_(v, const(15)), builder.lshr(v, const(4)))]
                    k.pair(4, row0_, col_, nc_, 4 * t + jj, *vals)
            return context.get_dummy_value()
        return sig, codegen

    deq_q4_0, deq_nib = deq_nib_factory(True), deq_nib_factory(False)
    return {"vdot8_nib_t": vdot8_nib_tokens(TOKENS), "vdot8_q8_0_t": vdot8_q8_0_tokens(TOKENS),
            "vdot8_q6_k_t": vdot8_q6_k_tokens(TOKENS), "vdot8_mxfp4_t": vdot8_mxfp4_tokens(TOKENS),
            "vdot8_nib": vdot8_nib, "vdot8_q4_k": vdot8_q4_k, "q4_k_scales": q4_k_scales, "vdot_q5_0": vdot_q5_0, "vdot8_q8_0": vdot8_q8_0, "vdot8_q6_k": vdot8_q6_k,
            "vdot8_mxfp4": vdot8_mxfp4, "deq_nib": deq_nib, "deq_q4_0": deq_q4_0, "deq_q5_0": deq_q5_0,
            "deq_q8_0": deq_q8_0, "deq_q6_k": deq_q6_k, "deq_mxfp4": deq_mxfp4}
