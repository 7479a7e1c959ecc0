"""CuPy fast paths: the CUDA C sources in `cuda/*.cu`, compiled with `cupy.RawModule` on first use.

Only imported when arrays are CuPy arrays, so a CPU machine never touches CuPy or NVRTC.
Under SPARK_LAB_DEVICE=strict the arrays are `device_strict` stand-ins and `RawModule` runs the
NumPy twin of each kernel from `TWINS` (below), so these wrappers run on a CPU as on a GPU.
Each wrapper takes and returns CuPy float32 arrays and has a NumPy twin in the kernel modules
(rmsnorm -> norms.rmsnorm, softmax -> activations.softmax, rope -> rope.rope,
attention_decode -> attention.attention with Tq = 1, qmatvec -> quants.quant_matmul,
moe_matvec_mxfp4 -> kernels.qmatvec.moe_matvec);
tests/kernels/test_cuda.py checks each pair on a GPU.
"""
from __future__ import annotations

import functools
import weakref
from pathlib import Path

import numpy as np

CUDA_DIR = Path(__file__).with_name("cuda")
SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
_Q4_1, _Q8_0, _MXFP4 = 3, 8, 39        # gguf.GGMLQuantizationType values
_QBLOCK = {_Q4_1: (32, 20), _Q8_0: (32, 34), _MXFP4: (32, 17)}   # qtype -> (weights per block, bytes per block)
_QKERNEL = {_Q4_1: ("qmatvec", "qmatvec_q4_1"), _Q8_0: ("qmatvec", "qmatvec_q8_0"), _MXFP4: ("mxfp4", "mxfp4_matvec")}
_MAX_DV = 256                          # attention.cu keeps 8 values per lane


def _cp(a):
    """The array module of `a`: cupy, or the strict stand-in (device_strict) under SPARK_LAB_DEVICE=strict."""
    from ..device import array_module
    xp = array_module(a)
    if xp is np:                       # a host array given to a CUDA wrapper: CuPy itself decides
        import cupy as xp
    return xp


@functools.lru_cache(maxsize=None)
def _module(cupy, name: str):
    src = (CUDA_DIR / f"{name}.cu").read_text()
    return cupy.RawModule(code=src, options=(f"-I{CUDA_DIR}",))


def _fn(cupy, module: str, kernel: str):
    return _module(cupy, module).get_function(kernel)


_CONSTANTS: dict = {}                  # (array module, dtype, bytes) -> device copy


def _constant(cupy, host, dtype):
    """A small host table (rope's inv_freq) on the device, copied once, not once per layer."""
    host = np.ascontiguousarray(host, dtype=dtype)
    key = (cupy, host.dtype.str, host.shape, host.tobytes())
    dev = _CONSTANTS.get(key)
    if dev is None:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        dev = _CONSTANTS[key] = cupy.asarray(host)
    return dev


def _f32(a):
    cupy = _cp(a)
    return cupy.ascontiguousarray(a, dtype=cupy.float32)


def _threads(n: int) -> int:
    """Block size for a row of n elements: a multiple of 32, at most 256."""
    return min(256, max(32, (n + 31) // 32 * 32))


def rmsnorm(x, w, eps: float, offset: float):
    """x [..., d], w [d] -> [..., d]; see rmsnorm.cu."""
    cupy = _cp(x)
    x, w = _f32(x), _f32(w)
    d = x.shape[-1]
    y = cupy.empty_like(x)
    rows = x.size // d if d else 0
    if rows:
        _fn(cupy, "rmsnorm", "rmsnorm_f32")((rows,), (_threads(d),), (x, w, y, np.int32(d), np.float32(eps), np.float32(offset)))
    return y


def softmax(x):
    """Softmax over the last axis of x [..., n]; see softmax.cu."""
    cupy = _cp(x)
    x = _f32(x)
    n = x.shape[-1]
    y = cupy.empty_like(x)
    rows = x.size // n if n else 0
    if rows:
        _fn(cupy, "softmax", "softmax_f32")((rows,), (_threads(n),), (x, y, np.int32(n)))
    return y


def rope(x, positions, theta: float, rotary_dim: int, neox: bool, freq_scale: float, inv_freq=None, mscale: float = 1.0):
    """x [T, H, D], positions [T] -> rotated [T, H, D]; see rope.cu. inv_freq [rotary_dim/2] float64
    (host): the scaled frequencies from rope.rope_freqs; default theta^(-2i/rd) * freq_scale."""
    cupy = _cp(x)
    x = _f32(x)
    T, H, D = x.shape
    pos = cupy.ascontiguousarray(positions, dtype=cupy.int64)
    if inv_freq is None:
        inv_freq = float(freq_scale) * float(theta) ** (-(np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    inv = _constant(cupy, inv_freq, np.float64)
    y = cupy.empty_like(x)
    n = T * H * (D // 2)
    if n:
        _fn(cupy, "rope", "rope_f32")(((n + 255) // 256,), (256,),
                                (x, pos, inv, y, np.int32(T), np.int32(H), np.int32(D), np.int32(rotary_dim),
                                 np.int32(1 if neox else 0), np.float64(mscale)))
    return y


def _rows_view(a):
    """a [T, H, D] with a unit stride on D -> (a, stride_T, stride_H) in elements."""
    cupy = _cp(a)
    if a.dtype != cupy.float32 or a.strides[2] != 4 or any(s % 4 for s in a.strides):
        a = _f32(a)
    return a, a.strides[0] // 4, a.strides[1] // 4


def attention_decode(q, k, v, causal: bool, q_offset: int, window, scale: float):
    """One query q [1, Hq, D] against k/v [Tk, Hkv, D] -> [1, Hq, Dv], or None when unsupported."""
    cupy = _cp(q)
    _, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    Dv = v.shape[2]
    if Dv > _MAX_DV or D > 4096:
        return None
    hi = min(Tk, q_offset + 1) if causal else Tk
    lo = max(0, q_offset - int(window) + 1) if window is not None else 0
    q = _f32(q).reshape(Hq, D)
    k, k_st, k_sh = _rows_view(k)
    v, v_st, v_sh = _rows_view(v)
    out = cupy.empty((1, Hq, Dv), dtype=cupy.float32)
    n_scores = max(hi, 1)
    scores = cupy.empty((Hq, n_scores), dtype=cupy.float32)
    threads = 256
    smem = (D + (threads // 32) * Dv) * 4
    _fn(cupy, "attention", "attn_decode_f32")(
        (Hq,), (threads,),
        (q, k, v, out, scores, np.int32(n_scores), np.int32(Hq), np.int32(Hkv), np.int32(D), np.int32(Dv),
         np.int64(k_st), np.int64(k_sh), np.int64(v_st), np.int64(v_sh),
         np.int32(lo), np.int32(max(lo, hi)), np.float32(scale)),
        shared_mem=smem)
    return out


def supports_qtype(qtype) -> bool:
    return int(qtype) in _QBLOCK


def qmatvec(x, data, qtype: int, rows: int, cols: int):
    """x [n, cols] f32 @ dequant(data).T -> [n, rows]; data uint8 [rows, row_bytes] on the GPU.

    Returns None when the weight is not a Q4_1/Q8_0/MXFP4 CuPy array (the caller then falls back).
    """
    cupy = _cp(x)
    if qtype not in _QBLOCK or not isinstance(data, cupy.ndarray) or cols % 32:
        return None
    qk, bs = _QBLOCK[qtype]
    if data.size != rows * (cols // qk) * bs:
        raise ValueError(f"qmatvec: {data.size} bytes of data do not hold a [{rows}, {cols}] weight of qtype {qtype}")
    data = cupy.ascontiguousarray(data)
    x = _f32(x)
    n = x.shape[0]
    y = cupy.empty((n, rows), dtype=cupy.float32)
    warps = 8
    _fn(cupy, *_QKERNEL[qtype])(((rows + warps - 1) // warps, n), (32 * warps,), (data, x, y, np.int32(rows), np.int32(cols)))
    return y


def moe_matvec_mxfp4(x, stack, expert_ids, round_x: bool = True):
    """The expert gather on the GPU: -> [k, rows] f32, row j = x (or x[j]) @ dequant(stack[expert_ids[j]]).T.

    x [cols] (one input for all k experts: gate, up) or [k, cols] (row j for expert j: down), f32;
    stack uint8 [n_expert, rows, cols/32 * 17]: MXFP4 blocks on the GPU (a GGUF's ffn_*_exps);
    expert_ids [k] ints (host or device; host ids are checked here, a device id out of range
    gives a NaN row). round_x: first round x to int8 blocks as the CPU kernels do
    (`linalg.round_x_q8`), so the GPU gives `kernels.qmatvec.moe_matvec`'s numbers. See mxfp4.cu.
    """
    cupy = _cp(x)
    if stack.ndim != 3 or stack.dtype != np.uint8 or stack.shape[2] % 17:
        raise ValueError(f"moe_matvec_mxfp4: stack must be uint8 [n_expert, rows, row_bytes] of 17-byte MXFP4 "
                         f"blocks, got {stack.dtype} {tuple(stack.shape)}")
    E, rows, row_bytes = (int(s) for s in stack.shape)
    cols = row_bytes // 17 * 32
    if isinstance(expert_ids, cupy.ndarray):
        ids = cupy.ascontiguousarray(expert_ids.reshape(-1), dtype=cupy.int32)
    else:
        host = np.asarray(expert_ids).reshape(-1)
        if host.size == 0 or not np.issubdtype(host.dtype, np.integer) or host.min() < 0 or host.max() >= E:
            raise ValueError(f"moe_matvec_mxfp4: expert ids must be integers in [0, {E}), got {host.tolist()}")
        ids = cupy.asarray(host.astype(np.int32))
    k = int(ids.size)
    x = _f32(x)
    if x.shape not in ((cols,), (k, cols)):
        raise ValueError(f"moe_matvec_mxfp4: x of shape {tuple(x.shape)} does not match {k} experts of "
                         f"[{rows}, {cols}] (needs [{cols}] or [{k}, {cols}])")
    x2 = x.reshape(-1, cols)                                                  # [1 or k, cols]
    if round_x:
        from .linalg import round_x_q8
        x2 = cupy.ascontiguousarray(round_x_q8(x2), dtype=cupy.float32)
    stack = cupy.ascontiguousarray(stack)
    y = cupy.empty((k, rows), dtype=cupy.float32)
    warps = 8
    _fn(cupy, "mxfp4", "mxfp4_moe_matvec")(
        ((rows + warps - 1) // warps, k), (32 * warps,),
        (stack, x2, ids, y, np.int32(rows), np.int32(cols), np.int32(0 if x.ndim == 1 else cols), np.int32(E)))
    return y


# ---------------------------------------------------------------------------- NumPy twins
# What each CUDA kernel computes, over the same launch arguments (NumPy buffers standing in for
# device pointers; outputs written in place). device_strict's RawModule runs these, so the
# wrappers above (packing, strides, output allocation) are exercised on a CPU; on a GPU,
# tests/kernels/test_cuda.py holds the real kernels to the same NumPy bodies.

def _twin_rmsnorm(x, w, y, d, eps, offset):
    from .norms import rmsnorm
    y.reshape(-1, d)[...] = rmsnorm(x.reshape(-1, d), w, float(eps), offset=float(offset))


def _twin_softmax(x, y, n):
    from .activations import softmax
    y.reshape(-1, n)[...] = softmax(x.reshape(-1, n))


def _twin_rope(x, pos, inv_freq, y, T, H, D, rd, neox, mscale):
    from .rope import rope
    ang = pos.astype(np.float64)[:, None] * inv_freq[None, :]                     # [T, rd/2]
    cos, sin = np.cos(ang), np.sin(ang)
    if float(mscale) != 1.0:
        cos, sin = cos * float(mscale), sin * float(mscale)
    table = cos.astype(np.float32)[:, None, :], sin.astype(np.float32)[:, None, :]
    y.reshape(T, H, D)[...] = rope(x.reshape(T, H, D), pos, rotary_dim=int(rd), neox=bool(neox), table=table)


def _twin_attn_decode(q, k, v, out, scores, n_scores, Hq, Hkv, D, Dv, k_st, k_sh, v_st, v_sh, lo, hi, scale):
    from numpy.lib.stride_tricks import as_strided
    from .attention import attention
    ks = as_strided(k, (int(hi), int(Hkv), int(D)), (int(k_st) * 4, int(k_sh) * 4, 4))[lo:hi]   # [hi-lo, Hkv, D]
    vs = as_strided(v, (int(hi), int(Hkv), int(Dv)), (int(v_st) * 4, int(v_sh) * 4, 4))[lo:hi]
    if hi > lo:
        out[...] = attention(q.reshape(1, int(Hq), int(D)), ks, vs, causal=False, scale=float(scale))
    else:
        out[...] = 0.0


# float32 copies of the weights the strict qmatvec twin has dequantized, so that a model's second
# token is a matmul rather than a whole-matrix dequantization per mat-vec (the notebooks on strict
# were ~100x slower than NumPy without it). Keyed by the weight's buffer address, shape, strides and
# type; an entry goes when the array owning the buffer does. Weights are not written after loading.
_DEQUANT_CACHE: dict = {}


def _dequantized(W, qtype: int, rows: int, cols: int):
    from ..quants import dequantize
    key = (W.__array_interface__["data"][0], W.shape, W.strides, qtype, rows, cols)
    hit = _DEQUANT_CACHE.get(key)
    if hit is not None and hit[0]() is not None:
        return hit[1]
    owner = W
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    wf = dequantize(W, qtype, (rows, cols))                                       # [rows, cols] f32
    _DEQUANT_CACHE[key] = (weakref.ref(owner, lambda _r, k=key: _DEQUANT_CACHE.pop(k, None)), wf)
    return wf


def _twin_qmatvec(qtype):
    def twin(W, x, y, rows, cols):
        # quants.quant_matmul(fast=False)'s chunked loop over the cached weight: the same bits
        from ..quants import chunked_matmul
        rows, cols = int(rows), int(cols)
        wf = _dequantized(W, qtype, rows, cols)                                   # [rows, cols] f32
        chunked_matmul(x.reshape(-1, cols), lambda r0, r1: wf[r0:r1], rows, y.reshape(-1, rows))
    return twin


def _twin_mxfp4_moe(W, x, ids, y, rows, cols, x_stride, n_expert):
    from ..quants import dequantize
    rows, cols, x_stride, E = int(rows), int(cols), int(x_stride), int(n_expert)
    W, xs, out = W.reshape(E, rows, -1), x.reshape(-1), y.reshape(-1, rows)
    for j, e in enumerate(ids.reshape(-1).tolist()):
        xj = xs[j * x_stride:j * x_stride + cols]
        out[j] = dequantize(W[e], _MXFP4, (rows, cols)) @ xj if 0 <= e < E else np.nan


TWINS = {
    "rmsnorm_f32": _twin_rmsnorm,
    "softmax_f32": _twin_softmax,
    "rope_f32": _twin_rope,
    "attn_decode_f32": _twin_attn_decode,
    "qmatvec_q8_0": _twin_qmatvec(_Q8_0),
    "qmatvec_q4_1": _twin_qmatvec(_Q4_1),
    "mxfp4_matvec": _twin_qmatvec(_MXFP4),
    "mxfp4_moe_matvec": _twin_mxfp4_moe,
}
