"""Sixteen keys at a time for decode attention: two numba intrinsics in LLVM IR, per head dim D.

    scores16(kb, ko, ks, q, qoff, s, soff)   # s.flat[soff + t] = q.flat[qoff:qoff+D] . K_t   t < 16
    wsum16(vb, vo, vs, e, eoff, o, ooff)     # o.flat[ooff:ooff+D] += sum_t e.flat[eoff + t] * V_t

K_t = kb.flat[ko + t ks : ko + t ks + D]: 16 float32 key rows ks elements apart (widened from the
cache's storage by `kv_rows.widen16`), V_t likewise; q, s, e, o: float32 arrays read or written
at an element offset.

Why. A decode step at long context spends its time here, one query head against thousands of
keys. numba's loops take one key at a time: a dot of D values ends in a horizontal sum (a chain of
shuffles and adds per key and head), and the weighted sum of values loads and stores the output
row for every key. Here the D/16 vectors of 16 keys go to 16 independent fused multiply-add
chains (no reduction per key), which a transposing tree of 15 adds then folds into one vector of
16 scores; and the values' output row stays in D/16 registers over the 16 keys. Every sum is taken
in a fixed order (the tree's), so a row's numbers depend on its keys only.
"""
from __future__ import annotations

LANES = 16
DIMS = (64, 128, 256)     # head dims with an unrolled pair (others take the kernel's plain loops)
_BUILT: dict = {}


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


def build(D: int):
    """(scores16, wsum16) intrinsics for head dim D (a multiple of 16); built once per D."""
    if D in _BUILT:
        return _BUILT[D]
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    L, C = LANES, D // LANES
    f32 = ir.FloatType()
    fv = ir.VectorType(f32, L)
    mask_t = ir.VectorType(ir.IntType(32), L)

    def ptr(context, builder, ty, val):
        return context.make_array(ty)(context, builder, val).data

    def vload(builder, p, off):
        return builder.load(builder.bitcast(builder.gep(p, [off]), fv.as_pointer()), align=4)

    def vstore(builder, v, p, off):
        builder.store(v, builder.bitcast(builder.gep(p, [off]), fv.as_pointer()), align=4)

    def splat(builder, s):
        v = builder.insert_element(ir.Constant(fv, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, v, ir.Constant(mask_t, [0] * L))

    def fold(builder, vs):
        """16 vectors -> one whose lanes hold each vector's sum (lane order: `order`)."""
        while len(vs) > 1:
            first, second = _masks(len(vs))
            m1, m2 = ir.Constant(mask_t, first), ir.Constant(mask_t, second)
            vs = [builder.fadd(builder.shuffle_vector(vs[2 * i], vs[2 * i + 1], m1),
                               builder.shuffle_vector(vs[2 * i], vs[2 * i + 1], m2)) for i in range(len(vs) // 2)]
        return vs[0]

    order = _fold_order(L)
    inverse = [order.index(t) for t in range(L)]                # lane holding row t

    def idx(builder, v, ty):
        return v if ty == types.intp else builder.sext(v, ir.IntType(64))

    def row_offsets(builder, off, off_t, stride, stride_t):
        o, st = idx(builder, off, off_t), idx(builder, stride, stride_t)
        return [builder.add(o, builder.mul(st, ir.Constant(st.type, t))) for t in range(L)]

    @intrinsic
    def scores16(typingctx, kb, ko, kst, q, qoff, s, soff):
        sig = types.void(kb, ko, kst, q, qoff, s, soff)

        def codegen(context, builder, sg, args):
            kp, qp, sp = (ptr(context, builder, sg.args[i], args[i]) for i in (0, 3, 5))
            qo, so = idx(builder, args[4], sg.args[4]), idx(builder, args[6], sg.args[6])
            rows = row_offsets(builder, args[1], sg.args[1], args[2], sg.args[2])
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fv, [fv] * 3), f"llvm.fma.v{L}f32")
            acc = [ir.Constant(fv, [0.0] * L) for _ in range(L)]
            for c in range(C):
                qv = vload(builder, qp, builder.add(qo, ir.Constant(qo.type, c * L)))
                for t in range(L):
                    acc[t] = builder.call(fma, [vload(builder, kp, builder.add(rows[t], ir.Constant(rows[t].type, c * L))), qv, acc[t]])
            r = fold(builder, acc)
            r = builder.shuffle_vector(r, r, ir.Constant(mask_t, inverse))
            vstore(builder, r, sp, so)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def wsum16(typingctx, vb, vo, vst, e, eoff, o, ooff):
        sig = types.void(vb, vo, vst, e, eoff, o, ooff)

        def codegen(context, builder, sg, args):
            vp, ep, op = (ptr(context, builder, sg.args[i], args[i]) for i in (0, 3, 5))
            eo, oo = idx(builder, args[4], sg.args[4]), idx(builder, args[6], sg.args[6])
            rows = row_offsets(builder, args[1], sg.args[1], args[2], sg.args[2])
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fv, [fv] * 3), f"llvm.fma.v{L}f32")
            offs = [builder.add(oo, ir.Constant(oo.type, c * L)) for c in range(C)]
            acc = [vload(builder, op, off) for off in offs]
            for t in range(L):
                w = splat(builder, builder.load(builder.gep(ep, [builder.add(eo, ir.Constant(eo.type, t))])))
                for c in range(C):
                    acc[c] = builder.call(fma, [w, vload(builder, vp, builder.add(rows[t], ir.Constant(rows[t].type, c * L))), acc[c]])
            for c in range(C):
                vstore(builder, acc[c], op, offs[c])
            return context.get_dummy_value()
        return sig, codegen

    _BUILT[D] = (scores16, wsum16)
    return _BUILT[D]


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
