"""CuPy fast paths: the CUDA C sources in `cuda/*.cu`, compiled with `cupy.RawModule` on first use.

Only imported when arrays are CuPy arrays, so a CPU machine never touches CuPy or NVRTC.
Each wrapper takes and returns CuPy float32 arrays and has a NumPy twin in the kernel modules
(rmsnorm -> norms.rmsnorm, softmax -> activations.softmax, rope -> rope.rope,
attention_decode -> attention.attention with Tq = 1, qmatvec -> quants.quant_matmul);
tests/kernels/test_cuda.py checks each pair on a GPU.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

CUDA_DIR = Path(__file__).with_name("cuda")
SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
_Q4_1, _Q8_0 = 3, 8                    # gguf.GGMLQuantizationType values
_QBLOCK = {_Q4_1: (32, 20), _Q8_0: (32, 34)}   # qtype -> (weights per block, bytes per block)
_MAX_DV = 256                          # attention.cu keeps 8 values per lane


@functools.lru_cache(maxsize=None)
def _module(name: str):
    import cupy
    src = (CUDA_DIR / f"{name}.cu").read_text()
    return cupy.RawModule(code=src, options=(f"-I{CUDA_DIR}",))


def _fn(module: str, kernel: str):
    return _module(module).get_function(kernel)


def _f32(a):
    import cupy
    return cupy.ascontiguousarray(a, dtype=cupy.float32)


def _threads(n: int) -> int:
    """Block size for a row of n elements: a multiple of 32, at most 256."""
    return min(256, max(32, (n + 31) // 32 * 32))


def rmsnorm(x, w, eps: float, offset: float):
    """x [..., d], w [d] -> [..., d]; see rmsnorm.cu."""
    import cupy
    x, w = _f32(x), _f32(w)
    d = x.shape[-1]
    y = cupy.empty_like(x)
    rows = x.size // d if d else 0
    if rows:
        _fn("rmsnorm", "rmsnorm_f32")((rows,), (_threads(d),), (x, w, y, np.int32(d), np.float32(eps), np.float32(offset)))
    return y


def softmax(x):
    """Softmax over the last axis of x [..., n]; see softmax.cu."""
    import cupy
    x = _f32(x)
    n = x.shape[-1]
    y = cupy.empty_like(x)
    rows = x.size // n if n else 0
    if rows:
        _fn("softmax", "softmax_f32")((rows,), (_threads(n),), (x, y, np.int32(n)))
    return y


def rope(x, positions, theta: float, rotary_dim: int, neox: bool, freq_scale: float):
    """x [T, H, D], positions [T] -> rotated [T, H, D]; see rope.cu."""
    import cupy
    x = _f32(x)
    T, H, D = x.shape
    pos = cupy.ascontiguousarray(positions, dtype=cupy.int64)
    y = cupy.empty_like(x)
    n = T * H * (D // 2)
    if n:
        _fn("rope", "rope_f32")(((n + 255) // 256,), (256,),
                                (x, pos, y, np.int32(T), np.int32(H), np.int32(D), np.int32(rotary_dim),
                                 np.int32(1 if neox else 0), np.float64(theta), np.float64(freq_scale)))
    return y


def _rows_view(a):
    """a [T, H, D] with a unit stride on D -> (a, stride_T, stride_H) in elements."""
    import cupy
    if a.dtype != cupy.float32 or a.strides[2] != 4 or any(s % 4 for s in a.strides):
        a = _f32(a)
    return a, a.strides[0] // 4, a.strides[1] // 4


def attention_decode(q, k, v, causal: bool, q_offset: int, window, scale: float):
    """One query q [1, Hq, D] against k/v [Tk, Hkv, D] -> [1, Hq, Dv], or None when unsupported."""
    import cupy
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
    _fn("attention", "attn_decode_f32")(
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

    Returns None when the weight is not a Q4_1/Q8_0 CuPy array (the caller then falls back).
    """
    import cupy
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
    name = "qmatvec_q8_0" if qtype == _Q8_0 else "qmatvec_q4_1"
    _fn("qmatvec", name)(((rows + warps - 1) // warps, n), (32 * warps,), (data, x, y, np.int32(rows), np.int32(cols)))
    return y
