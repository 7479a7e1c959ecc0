"""Sixteen KV-cache values widened to float32 in registers: a numba intrinsic for decode attention.

    widen16(a, off, scale, row, roff)     # row[roff:roff+16] = float32(a.flat[off:off+16]) * scale

`a` is C-contiguous float32, uint16 holding float16 bits (one `fpext <16 x half>`: VCVTPH2PS on
F16C/AVX-512 CPUs, exact for every value, infinities and NaN included) or int8 q8_0 codes (sign
extended and converted; `scale` is the block's float32 scale, 1.0 for the float types).
LLVM lowers each to a handful of vector instructions for the CPU at hand, which a scalar loop over
the bits (shifts, masks, a rebias multiply) does not reach.
"""
from __future__ import annotations

LANES = 16
PREFETCH_VALUES = 2048   # a read hint this many values ahead, into L2: the cache streams through once per step
                         # (f16 at 16k, 2 threads, Zen 4, when every row went through here: 1024 values into L1
                         # 5.4 ms/layer, 2048 into L2 3.9; now the tiles of attn_blocks take whole 16-key blocks)
_INTRINSIC = None


def widen16_intrinsic():
    """Build (once) and return the numba intrinsic; needs numba and llvmlite."""
    global _INTRINSIC
    if _INTRINSIC is not None:
        return _INTRINSIC
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    L = LANES
    fv = ir.VectorType(ir.FloatType(), L)

    @intrinsic
    def widen16(typingctx, a, off, scale, row, roff):
        if not (isinstance(a, types.Array) and isinstance(row, types.Array)):
            return None
        dt = a.dtype
        if dt not in (types.float32, types.uint16, types.int8) or row.dtype != types.float32:
            return None
        sig = types.void(a, off, scale, row, roff)

        def codegen(context, builder, sg, args):
            av, o, s, rv, ro = args
            src = context.make_array(sg.args[0])(context, builder, av).data
            dst = context.make_array(sg.args[3])(context, builder, rv).data
            o = context.cast(builder, o, sg.args[1], types.intp)
            ro = context.cast(builder, ro, sg.args[4], types.intp)
            s = context.cast(builder, s, sg.args[2], types.float32)
            p = builder.gep(src, [o])
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
            builder.call(pf, [builder.bitcast(builder.gep(p, [ir.Constant(ir.IntType(64), PREFETCH_VALUES)]), i8p),
                              ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
            if dt == types.float32:
                x = builder.load(builder.bitcast(p, fv.as_pointer()), align=4)
            elif dt == types.uint16:
                h = builder.load(builder.bitcast(p, ir.VectorType(ir.IntType(16), L).as_pointer()), align=2)
                x = builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), L)), fv)
            else:
                c = builder.load(builder.bitcast(p, ir.VectorType(ir.IntType(8), L).as_pointer()), align=1)
                x = builder.sitofp(c, fv)
            sv = builder.insert_element(ir.Constant(fv, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
            sv = builder.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(ir.IntType(32), L), [0] * L))
            x = builder.fmul(x, sv)
            builder.store(x, builder.bitcast(builder.gep(dst, [ro]), fv.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    _INTRINSIC = widen16
    return widen16
