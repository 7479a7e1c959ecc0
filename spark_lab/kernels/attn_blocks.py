"""Sixteen keys at a time for decode attention: numba intrinsics in LLVM IR, one pair per number of
query heads H (4, 2 or 1) that share the keys, each with a body per head dim D in DIMS (a switch on D).

    scores(k, ks, koff, kst, q, qoff, s, soff, sst, D)
        # s.flat[soff + h sst + t] = q.flat[qoff + h D : qoff + (h+1) D] . K_t     h < H, t < 16
    wsum(v, vs, voff, vst, e, eoff, est, o, ooff, D)
        # o.flat[ooff + h D : ooff + (h+1) D] += sum_t e.flat[eoff + h est + t] V_t

K_t = k.flat[koff + t kst : koff + t kst + D] is one key row in the cache's storage: float32,
uint16 holding float16 bits (one VCVTPH2PS per 16 values), or int8 q8_0 codes (sign extended,
converted, times the row's block scale ks.flat[(koff + t kst + d) / 32]; ks is never read for the
float types). V_t likewise. q, s, e, o: float32 arrays read or written at an element offset.

Why. A decode step at long context spends its time here: an 8B model at 16k keys does 134 M
multiply-adds per layer over 64 MB of f16 rows. The work is a register tile, so that each value
loaded from the cache or the query feeds several fused multiply-adds and the loads never outnumber
the FMAs: scores take H heads x 16/H keys (H query chunks and 16/H key chunks per 16 FMAs; 16
independent chains, no reduction per key), and a transposing tree of 15 adds folds the 16 chains into
one vector of H x 16/H scores; the weighted sum keeps H heads x 16/H chunks of the output rows in
registers over the 16 keys (16/H value chunks and H weights per 16 FMAs). Rows are widened straight
from the cache into registers: no float32 copy of the block is written and read back. Each read of
the cache also asks for the same bytes AHEAD positions later into L2. Every sum is taken in a fixed
order, so a row's numbers depend on its keys only.
"""
from __future__ import annotations

LANES = 16
DIMS = (64, 128, 256)     # head dims with tiles (others take the kernel's plain loops)
HEADS = (4, 2, 1)         # query heads per tile; a group of G takes 4s, then a 2, then a 1
AHEAD = 32                # read hint distance in key positions (16-64 measured alike, 8 slower, none 2x slower)
AHEAD_BYTES = 4096        # q8_tile's read hint distance in the key tiles
AHEAD_V = 512             # q8_vsum's read hint: the next value block's bytes (the next call's; the last
                          # block's next are the next KV head's first)
_BUILT: dict = {}


def _splat(builder, x, vt):
    """LLVM IR: the scalar x in every lane of a vector of type vt."""
    from llvmlite import ir
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, vt.count), [0] * vt.count))


def _hint_l2(builder, p):
    """LLVM IR: ask for the line at pointer p into L2 (PREFETCHT1: a read, locality 2)."""
    from llvmlite import ir
    from numba.core import cgutils
    i8, i32 = ir.IntType(8), ir.IntType(32)
    pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]),
                                        "llvm.prefetch.p0")
    builder.call(pf, [builder.bitcast(p, i8.as_pointer()), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])


def _floats16(builder, p, off, dtype):
    """LLVM IR: <16 x float> of the 16 values at element offset off of pointer p: float32, or uint16
    float16 bits widened (VCVTPH2PS): f16 cache rows, and the q8_0 tiles' scales (llama.cpp's q8_0 scale)."""
    from llvmlite import ir
    from numba.core import types
    f32 = ir.FloatType()
    if dtype == types.uint16:
        h = builder.load(builder.bitcast(builder.gep(p, [off]), ir.VectorType(ir.IntType(16), LANES).as_pointer()), align=2)
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), LANES)), ir.VectorType(f32, LANES))
    return builder.load(builder.bitcast(builder.gep(p, [off]), ir.VectorType(f32, LANES).as_pointer()), align=4)


def _masks(n: int):
    """Shuffle masks (first, second) that fold two of n vectors into one: with n vectors left,
    each row's partial sums fill n lanes; each block of n lanes keeps its rows' halves from both
    vectors (first: the lower n/2 lanes of each, second: the upper), so first + second carries
    twice the rows, n/2 lanes each."""
    g = n // 2
    first, second = [], []
    for blk in range(0, LANES, n):
        first += list(range(blk, blk + g)) + [LANES + i for i in range(blk, blk + g)]
        second += list(range(blk + g, blk + n)) + [LANES + i for i in range(blk + g, blk + n)]
    return first, second


def build():
    """{H: (scores, wsum)} intrinsics; built once."""
    if _BUILT:
        return _BUILT
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    L = LANES
    f32, i8, i32, i64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
    fv = ir.VectorType(f32, L)
    mask_t = ir.VectorType(i32, L)
    order = _fold_order(L)
    inverse = [order.index(t) for t in range(L)]                # lane holding chain t

    def ptr(context, builder, ty, val):
        return context.make_array(ty)(context, builder, val).data

    def at(builder, off, n):
        return builder.add(off, ir.Constant(i64, n))

    def vload(builder, p, off):
        return builder.load(builder.bitcast(builder.gep(p, [off]), fv.as_pointer()), align=4)

    def splat(builder, s):
        return _splat(builder, s, fv)

    def fold(builder, vs):
        """16 vectors -> one whose lanes hold each vector's sum (lane order: `order`)."""
        while len(vs) > 1:
            first, second = _masks(len(vs))
            m1, m2 = ir.Constant(mask_t, first), ir.Constant(mask_t, second)
            vs = [builder.fadd(builder.shuffle_vector(vs[2 * i], vs[2 * i + 1], m1),
                               builder.shuffle_vector(vs[2 * i], vs[2 * i + 1], m2)) for i in range(len(vs) // 2)]
        return vs[0]

    def rows_of(dt):
        """(chunk(row, c) -> <16 x float>: values 16c.. of the row at element offset row; hint) for storage dt."""
        def make(builder, p, sp):
            def hint(off, ahead, row_start=False):
                off = builder.add(off, ahead)
                _hint_l2(builder, builder.gep(p, [off]))
                if dt == types.int8 and row_start:       # the row's block scales: 128 B per position at 8 KV heads
                    _hint_l2(builder, builder.gep(sp, [builder.lshr(off, ir.Constant(i64, 5))]))

            memo = {}                                   # a q8_0 block's scale, splat once per row and block

            def chunk(row, c):                          # chunk c of the row at element offset row
                if dt == types.float32 or dt == types.uint16:
                    return _floats16(builder, p, at(builder, row, c * L), dt)
                q = builder.gep(p, [at(builder, row, c * L)])
                key = (id(row), c // 2)
                if key not in memo:
                    srow = builder.lshr(row, ir.Constant(i64, 5))                   # row is a multiple of 32
                    memo[key] = splat(builder, builder.load(builder.gep(sp, [at(builder, srow, c // 2)])))
                codes = builder.load(builder.bitcast(q, ir.VectorType(i8, L).as_pointer()), align=1)
                return builder.fmul(builder.sitofp(codes, fv), memo[key])
            return chunk, hint
        per_line = {types.float32: 1, types.uint16: 2, types.int8: 4}[dt]   # 16-value chunks per 64-byte line
        return make, per_line

    def per_dim(context, builder, d_arg, d_ty, emit):
        """emit(D) for the head dim the argument holds, one case per D in DIMS; no code for others."""
        end = builder.append_basic_block("tile.end")
        sw = builder.switch(context.cast(builder, d_arg, d_ty, types.int64), end)
        for D in DIMS:
            case = builder.append_basic_block(f"tile.d{D}")
            sw.add_case(ir.Constant(i64, D), case)
            builder.position_at_end(case)
            emit(D)
            builder.branch(end)
        builder.position_at_end(end)

    def tile(emit):
        """A tile intrinsic (rows, scales, i0, i1, x, i2, i3 | y, i4, D): rows the cache's storage (ok()),
        the other arrays float32; emit(builder, D, chunk, hint, per_line, arrays, ints, ahead, fma)
        writes its body for head dim D, with `arrays` the data pointers of the array arguments after the
        scales and `ints` the integers as int64 (ints[1] the rows' stride)."""
        @intrinsic
        def fn(typingctx, rows, scales, a2, a3, a4, a5, a6, a7, a8, dim):
            if not (isinstance(rows, types.Array) and rows.dtype in (types.float32, types.uint16, types.int8)
                    and isinstance(scales, types.Array) and scales.dtype == types.float32):
                return None
            sig = types.void(rows, scales, a2, a3, a4, a5, a6, a7, a8, dim)
            make, per_line = rows_of(rows.dtype)

            def codegen(context, builder, sg, args):
                rp, sp = (ptr(context, builder, sg.args[i], args[i]) for i in (0, 1))
                arrays = [ptr(context, builder, t, v) for t, v in zip(sg.args[2:9], args[2:9]) if isinstance(t, types.Array)]
                ints = [context.cast(builder, v, t, types.int64) for t, v in zip(sg.args[2:9], args[2:9])
                        if not isinstance(t, types.Array)]
                ahead = builder.mul(ints[1], ir.Constant(i64, AHEAD))
                fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fv, [fv] * 3), f"llvm.fma.v{L}f32")
                per_dim(context, builder, args[9], sg.args[9],
                        lambda D: emit(builder, D, *make(builder, rp, sp), per_line, arrays, ints, ahead, fma))
                return context.get_dummy_value()
            return sig, codegen
        return fn

    def scores_for(H):
        """scores(k, ks, koff, kst, q, qoff, s, soff, sst, D) for H heads x 16/H keys per sub-tile."""
        KT = L // H                                             # keys per sub-tile

        def emit(builder, D, chunk, hint, per_line, arrays, ints, ahead, fma):
            (qp, op), (ko, kstride, qo, so, sstride) = arrays, ints
            for sub in range(H):
                rows = [builder.add(ko, builder.mul(kstride, ir.Constant(i64, sub * KT + t))) for t in range(KT)]
                acc = [ir.Constant(fv, [0.0] * L) for _ in range(L)]          # chain h KT + t
                for c in range(D // L):
                    qv = [vload(builder, qp, at(builder, qo, h * D + c * L)) for h in range(H)]
                    for t in range(KT):
                        if c % per_line == 0:
                            hint(at(builder, rows[t], c * L), ahead, c == 0)
                        kv = chunk(rows[t], c)
                        for h in range(H):
                            acc[h * KT + t] = builder.call(fma, [kv, qv[h], acc[h * KT + t]])
                r = fold(builder, acc)
                r = builder.shuffle_vector(r, r, ir.Constant(mask_t, inverse))     # lane h KT + t
                for h in range(H):
                    part = builder.shuffle_vector(r, r, ir.Constant(ir.VectorType(i32, KT), list(range(h * KT, h * KT + KT))))
                    dst = builder.gep(op, [builder.add(so, builder.add(builder.mul(sstride, ir.Constant(i64, h)),
                                                                       ir.Constant(i64, sub * KT)))])
                    builder.store(part, builder.bitcast(dst, ir.VectorType(f32, KT).as_pointer()), align=4)
        return tile(emit)

    def wsum_for(H):
        """wsum(v, vs, voff, vst, e, eoff, est, o, ooff, D) for H heads x 16/H output chunks per pass."""
        def emit(builder, D, chunk, hint, per_line, arrays, ints, ahead, fma):
            (ep, op), (vo, vstride, eo, estride, oo) = arrays, ints
            CT = min(L // H, D // L)                            # output chunks per head per pass
            rows = [builder.add(vo, builder.mul(vstride, ir.Constant(i64, t))) for t in range(L)]
            ehead = [builder.add(eo, builder.mul(estride, ir.Constant(i64, h))) for h in range(H)]
            for p in range(D // L // CT):
                offs = [[at(builder, oo, h * D + (p * CT + c) * L) for c in range(CT)] for h in range(H)]
                acc = [[vload(builder, op, offs[h][c]) for c in range(CT)] for h in range(H)]
                for t in range(L):
                    w = [splat(builder, builder.load(builder.gep(ep, [at(builder, ehead[h], t)]))) for h in range(H)]
                    for c in range(CT):
                        if (p * CT + c) % per_line == 0:
                            hint(at(builder, rows[t], (p * CT + c) * L), ahead, p * CT + c == 0)
                        vv = chunk(rows[t], p * CT + c)
                        for h in range(H):
                            acc[h][c] = builder.call(fma, [w[h], vv, acc[h][c]])
                for h in range(H):
                    for c in range(CT):
                        builder.store(acc[h][c], builder.bitcast(builder.gep(op, [offs[h][c]]), fv.as_pointer()), align=4)
        return tile(emit)

    _BUILT.update({H: (scores_for(H), wsum_for(H)) for H in HEADS})
    _BUILT["q8_tile"] = q8_tile_intrinsics(ptr, vload)
    _BUILT["max16"] = max16_intrinsic(ptr, vload)
    _BUILT["q8_vsum"] = q8_vsum_intrinsics(ptr)
    _BUILT["q8_weights"] = q8_weights_intrinsic(ptr)
    return _BUILT


def q8_tile_intrinsics(ptr, vload):
    """{H: q8_tile} for H query heads at once (4, 2, 1):

        q8_tile(kt, ks, koff, ksoff, qi, qoff, D, qc, qd, hb, nb, o, ooff, ost)
        # o.flat[ooff + h ost + t] += (sum_j (k_tj + 128) qi.flat[qoff + h D + j] - qc.flat[hb + h nb])
        #                            * ks.flat[ksoff + t] * qd.flat[hb + h nb]          h < H, t < 16, j < 32

    one 32-value block of the 16 keys of a q8_0 key tile (llm/cache.py) against H query heads
    quantized to int8, lanes = keys. kt.flat[koff:] holds the block as 8 dword rows of 16 keys (4
    codes + 128 each): each 64-byte row is loaded once and feeds H VPDPBUSD (u8 keys x s8 query, 64
    products into 16 int32 lanes) with that head's 4 codes splat; qc = 128 * the block's query code
    sum takes the key bias off. Per 16 keys x 32 values x head: 8 instructions where the float tile
    takes 32 multiply-adds and the conversions of the keys. The integer sums are exact; only the
    scaling rounds (llama.cpp also quantizes the query to q8_0 for a q8_0 key cache). Without
    AVX512-VNNI the products are widened to 16 bits and summed (portable)."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic
    from .qmatvec.simd import dot4, vnni

    L = LANES
    i32, i64 = ir.IntType(32), ir.IntType(64)
    iv, fv = ir.VectorType(i32, L), ir.VectorType(ir.FloatType(), L)
    VNNI = vnni()

    def make(H):
        @intrinsic
        def q8_tile(typingctx, kt, ks, koff, ksoff, qi, qoff, D, qc, qd, hb, nb, o, ooff, ost):
            if not (isinstance(kt, types.Array) and kt.dtype == types.uint8 and isinstance(qi, types.Array)
                    and qi.dtype == types.int8):
                return None
            sig = types.void(kt, ks, koff, ksoff, qi, qoff, D, qc, qd, hb, nb, o, ooff, ost)

            def codegen(context, builder, sg, args):
                kp, sp, qp, cp, dp, op = (ptr(context, builder, sg.args[i], args[i]) for i in (0, 1, 4, 7, 8, 11))
                ko, so, qo, Dv, hbv, nbv, oo, ostv = (context.cast(builder, args[i], sg.args[i], types.int64)
                                                     for i in (2, 3, 5, 6, 9, 10, 12, 13))
                acc = [ir.Constant(iv, [0] * L) for _ in range(H)]
                for w in range(8):
                    kq = builder.gep(kp, [builder.add(ko, ir.Constant(i64, 64 * w))])
                    if AHEAD_BYTES:
                        _hint_l2(builder, builder.gep(kq, [ir.Constant(i64, AHEAD_BYTES)]))
                    kw = builder.load(builder.bitcast(kq, iv.as_pointer()), align=1)
                    for h in range(H):
                        qa = builder.add(qo, builder.add(builder.mul(Dv, ir.Constant(i64, h)), ir.Constant(i64, 4 * w)))
                        qw = builder.load(builder.bitcast(builder.gep(qp, [qa]), i32.as_pointer()), align=1)
                        acc[h] = dot4(builder, acc[h], kw, _splat(builder, qw, iv), VNNI)
                dk = _floats16(builder, sp, so, sg.args[1].dtype)
                for h in range(H):
                    hi = builder.add(hbv, builder.mul(nbv, ir.Constant(i64, h)))
                    qcv = builder.trunc(builder.load(builder.gep(cp, [hi])), i32)
                    scale = builder.fmul(dk, _splat(builder, builder.load(builder.gep(dp, [hi])), fv))
                    a = builder.sitofp(builder.sub(acc[h], _splat(builder, qcv, iv)), fv)
                    dst = builder.bitcast(builder.gep(op, [builder.add(oo, builder.mul(ostv, ir.Constant(i64, h)))]), fv.as_pointer())
                    builder.store(builder.fadd(builder.load(dst, align=4), builder.fmul(a, scale)), dst, align=4)
                return context.get_dummy_value()
            return sig, codegen
        return q8_tile
    return {H: make(H) for H in HEADS}


def q8_vsum_intrinsics(ptr):
    """{H: q8_vsum} for H query heads at once (4, 2, 1):

        q8_vsum(vt, voff, vst, nt, b, w, woff, wst, wpart, r)
        # r.flat[(2 h + part) 32 + d] = sum_{i < nt, t < 16} w.flat[woff + h wst + part wpart + 16 i + t]
        #                                * (int8) vt.flat[voff + i vst + 512 b + 128 (t / 4) + 4 d + t % 4]
        #                                                          h < H, part < 2 (high, low byte), d < 32

    value block b (32 dims) of nt q8_0 value tiles (llm/cache.py: a tile at voff + i vst holds, per
    block, 4 quads of 4 keys as [32 dims, 4 keys] bytes) against H heads' softmax weights as 16-bit
    integers split into bytes (w: high and low parts, a byte per position, positions 16 i + t).
    Lanes = value dims: each 64-byte load of a quad (16 dims x 4 keys) feeds 2 H VPDPBUSD (u8 weights
    splat x s8 codes). Per 16 keys x 32 values x head: 16 instructions where the float tile takes 32
    multiply-adds and the conversions of the values. The sums are exact int32 (at most 272 positions x
    255 x 127 a part); the caller scales them. Without AVX512-VNNI the products are widened (portable)."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
    from .qmatvec.simd import dot4, vnni

    L = LANES
    i32, i64 = ir.IntType(32), ir.IntType(64)
    iv = ir.VectorType(i32, L)
    VNNI = vnni()

    def make(H):
        @intrinsic
        def q8_vsum(typingctx, vt, voff, vst, nt, b, w, woff, wst, wpart, r):
            if not (isinstance(vt, types.Array) and vt.dtype == types.uint8 and isinstance(w, types.Array)
                    and w.dtype == types.uint8 and isinstance(r, types.Array) and r.dtype == types.int32):
                return None
            sig = types.void(vt, voff, vst, nt, b, w, woff, wst, wpart, r)

            def codegen(context, builder, sg, args):
                vp, wp, rp = (ptr(context, builder, sg.args[i], args[i]) for i in (0, 5, 9))
                vo, vs, ntv, bv, wo, wsv, wpv = (context.cast(builder, args[i], sg.args[i], types.int64)
                                                 for i in (1, 2, 3, 4, 6, 7, 8))
                cells = [cgutils.alloca_once_value(builder, ir.Constant(iv, [0] * L)) for _ in range(4 * H)]
                ahead = ir.Constant(i64, AHEAD_V)
                with cgutils.for_range(builder, ntv) as loop:
                    i = loop.index
                    base = builder.add(builder.add(vo, builder.mul(i, vs)), builder.mul(bv, ir.Constant(i64, 512)))
                    wbase = builder.add(wo, builder.mul(i, ir.Constant(i64, 16)))
                    acc = [builder.load(c) for c in cells]
                    for k in range(4):
                        vv = []
                        for c in range(2):
                            q = builder.gep(vp, [builder.add(base, ir.Constant(i64, 128 * k + 64 * c))])
                            _hint_l2(builder, builder.gep(q, [ahead]))
                            vv.append(builder.load(builder.bitcast(q, iv.as_pointer()), align=1))
                        for h in range(H):
                            for part in range(2):
                                at = builder.add(builder.add(wbase, builder.mul(wsv, ir.Constant(i64, h))),
                                                 builder.add(builder.mul(wpv, ir.Constant(i64, part)), ir.Constant(i64, 4 * k)))
                                wd = builder.load(builder.bitcast(builder.gep(wp, [at]), i32.as_pointer()), align=1)
                                ws = _splat(builder, wd, iv)
                                for c in range(2):
                                    x = (2 * h + part) * 2 + c
                                    acc[x] = dot4(builder, acc[x], ws, vv[c], VNNI)
                    for c, a in zip(cells, acc):
                        builder.store(a, c)
                for x, c in enumerate(cells):
                    dst = builder.gep(rp, [ir.Constant(i64, 16 * x)])
                    builder.store(builder.load(c), builder.bitcast(dst, iv.as_pointer()), align=4)
                return context.get_dummy_value()
            return sig, codegen
        return q8_vsum
    return {H: make(H) for H in HEADS}


def q8_weights_intrinsic(ptr):
    """q8_weights(e, eoff, vs, soff, sst, nt, wq, woff, wpart, m, moff) (below)."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    L = LANES
    i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
    iv, fv, bv = ir.VectorType(i32, L), ir.VectorType(f32, L), ir.VectorType(i8, L)

    @intrinsic
    def q8_weights(typingctx, e, eoff, vs, soff, sst, nt, wq, woff, wpart, m, moff):
        """A head's softmax weights for one 32-value block of q8_0 value tiles as 16-bit integers:
        w_p = e.flat[eoff + p] * vs.flat[soff + (p / 16) sst + p % 16] (the value's q8_0 scale) for the
        16 nt positions p; M = max w (m.flat[moff] = M); wq.flat[woff + p] = the high byte and
        wq.flat[woff + wpart + p] the low byte of round(w_p 65535 / M). A position whose w is not a
        number (e = 0 off the keys times a stale scale) gets 0; M ignores it."""
        if not (isinstance(wq, types.Array) and wq.dtype == types.uint8):
            return None
        sig = types.void(e, eoff, vs, soff, sst, nt, wq, woff, wpart, m, moff)

        def codegen(context, builder, sg, args):
            ep, sp, wp, mp = (ptr(context, builder, sg.args[i], args[i]) for i in (0, 2, 6, 9))
            eo, so, sstv, ntv, wo, wpv, mo = (context.cast(builder, args[i], sg.args[i], types.int64)
                                              for i in (1, 3, 4, 5, 7, 8, 10))
            mod = builder.module
            maxnum = cgutils.get_or_insert_function(mod, ir.FunctionType(fv, [fv, fv]), f"llvm.maxnum.v{L}f32")
            rmax = cgutils.get_or_insert_function(mod, ir.FunctionType(f32, [fv]), f"llvm.vector.reduce.fmax.v{L}f32")
            minnum = cgutils.get_or_insert_function(mod, ir.FunctionType(fv, [fv, fv]), f"llvm.minnum.v{L}f32")
            rint = cgutils.get_or_insert_function(mod, ir.FunctionType(fv, [fv]), f"llvm.rint.v{L}f32")

            def weights(i):
                ev = builder.load(builder.bitcast(builder.gep(ep, [builder.add(eo, builder.mul(i, ir.Constant(i64, L)))]),
                                                  fv.as_pointer()), align=4)
                sv = _floats16(builder, sp, builder.add(so, builder.mul(i, sstv)), sg.args[2].dtype)
                return builder.fmul(ev, sv)
            cell = cgutils.alloca_once_value(builder, ir.Constant(fv, [0.0] * L))
            with cgutils.for_range(builder, ntv) as loop:
                builder.store(builder.call(maxnum, [builder.load(cell), weights(loop.index)]), cell)
            M = builder.call(rmax, [builder.load(cell)])
            builder.store(M, builder.gep(mp, [mo]))
            pos = builder.fcmp_ordered(">", M, ir.Constant(f32, 0.0))
            c = builder.select(pos, builder.fdiv(ir.Constant(f32, 65535.0), M), ir.Constant(f32, 0.0))
            cv = _splat(builder, c, fv)
            with cgutils.for_range(builder, ntv) as loop:
                y = builder.fmul(weights(loop.index), cv)              # 0..65535 (NaN -> 0, past the top -> 65535)
                y = builder.call(minnum, [builder.call(maxnum, [y, ir.Constant(fv, [0.0] * L)]), ir.Constant(fv, [65535.0] * L)])
                q = builder.fptosi(builder.call(rint, [y]), iv)
                at = builder.add(wo, builder.mul(loop.index, ir.Constant(i64, L)))
                hi = builder.trunc(builder.lshr(q, ir.Constant(iv, [8] * L)), bv)
                builder.store(hi, builder.bitcast(builder.gep(wp, [at]), bv.as_pointer()), align=1)
                lo = builder.trunc(q, bv)
                builder.store(lo, builder.bitcast(builder.gep(wp, [builder.add(at, wpv)]), bv.as_pointer()), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return q8_weights


def max16_intrinsic(ptr, vload):
    """max16(a, aoff, m, moff) (below)."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
    fv = ir.VectorType(ir.FloatType(), LANES)

    @intrinsic
    def max16(typingctx, a, aoff, m, moff):
        """m.flat[moff:moff+16] = max(m.flat[moff:...], a.flat[aoff:aoff+16]) lane by lane (a NaN wins):
        the running maximum of a tile's 16 scores, so the softmax needs no pass over them for it."""
        sig = types.void(a, aoff, m, moff)

        def codegen(context, builder, sg, args):
            ap, mp = ptr(context, builder, sg.args[0], args[0]), ptr(context, builder, sg.args[2], args[2])
            ao, mo = (context.cast(builder, args[i], sg.args[i], types.int64) for i in (1, 3))
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fv, [fv, fv]), f"llvm.maximum.v{LANES}f32")
            dst = builder.bitcast(builder.gep(mp, [mo]), fv.as_pointer())
            builder.store(builder.call(fn, [builder.load(dst, align=4), vload(builder, ap, ao)]), dst, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return max16


def _fold_order(L: int = LANES):
    """Simulate `fold` on row labels: the row whose sum ends in each lane."""
    vs = [[{i} for _ in range(L)] for i in range(L)]
    while len(vs) > 1:
        first, second = _masks(len(vs))
        nxt = []
        for i in range(len(vs) // 2):
            ab = vs[2 * i] + vs[2 * i + 1]
            nxt.append([ab[a] | ab[b] for a, b in zip(first, second)])
        vs = nxt
    out = []
    for lane in vs[0]:
        assert len(lane) == 1, "a lane mixes rows"
        out.append(next(iter(lane)))
    return out
