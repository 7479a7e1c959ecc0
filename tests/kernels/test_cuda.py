"""Every CuPy path against its NumPy twin (run on a GPU machine by scripts/gpu_check.sh).

The CUDA kernels (cuda/*.cu via cuda_kernels) are called both directly and through the public
kernels, which dispatch to them for CuPy arrays; the remaining kernels run their one xp body
on CuPy and must agree with the same body on NumPy.
"""
import numpy as np
import pytest

import spark_lab.kernels as K

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture(scope="module")
def ck(cp):
    from spark_lab.kernels import cuda_kernels
    return cuda_kernels


def _x(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _close(got, want, rtol=1e-5, atol=1e-5):
    got = got.get() if hasattr(got, "get") else got
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(1, 576), (7, 640), (3, 5, 1000), (2, 33)])
def test_rmsnorm_kernel(cp, ck, shape):
    x, w = _x(shape), _x(shape[-1], 1)
    for off in (0.0, 1.0):
        want = K.rmsnorm(x, w, 1e-6, offset=off)
        _close(ck.rmsnorm(cp.asarray(x), cp.asarray(w), 1e-6, off), want)
        _close(K.rmsnorm(cp.asarray(x), cp.asarray(w), 1e-6, offset=off), want)


@pytest.mark.parametrize("shape", [(1, 49152), (9, 1024), (4, 3, 7)])
def test_softmax_kernel(cp, ck, shape):
    x = _x(shape, scale=10.0)
    _close(ck.softmax(cp.asarray(x)), K.softmax(x), atol=1e-7)
    _close(K.softmax(cp.asarray(x)), K.softmax(x), atol=1e-7)


def test_softmax_masked_rows_on_gpu(cp, ck):
    x = _x((3, 16))
    x[1] = -np.inf
    _close(ck.softmax(cp.asarray(x)), K.softmax(x), atol=1e-7)
    keep = np.tril(np.ones((3, 16), bool))
    _close(K.softmax(cp.asarray(x), mask=cp.asarray(keep)), K.softmax(x, mask=keep), atol=1e-7)


@pytest.mark.parametrize("neox,rd,theta,fs", [(False, 64, 1e4, 1.0), (True, 256, 1e6, 0.125), (True, 32, 1e4, 1.0), (False, 16, 5e5, 1.0)])
def test_rope_kernel(cp, ck, neox, rd, theta, fs):
    D = 256 if rd > 64 else 64
    x = _x((7, 3, D))
    pos = np.array([0, 1, 2, 500, 4095, 32767, 131071])
    want = K.rope(x, pos, theta=theta, rotary_dim=rd, neox=neox, freq_scale=fs)
    _close(ck.rope(cp.asarray(x), cp.asarray(pos), theta, rd, neox, fs), want)
    _close(K.rope(cp.asarray(x), cp.asarray(pos), theta=theta, rotary_dim=rd, neox=neox, freq_scale=fs), want)


@pytest.mark.parametrize("Hq,Hkv,D,Tk,causal,window", [
    (9, 3, 64, 300, True, None),      # SmolLM2 decode
    (4, 1, 256, 700, True, 512),      # Gemma3 sliding-window layer
    (8, 8, 40, 77, False, None),      # cross-attention, one query
    (4, 2, 32, 1, True, None),        # the very first token
])
def test_attention_decode_kernel(cp, ck, Hq, Hkv, D, Tk, causal, window):
    q, k, v = _x((1, Hq, D), 1), _x((Tk, Hkv, D), 2), _x((Tk, Hkv, D), 3)
    want = K.attention(q, k, v, causal=causal, q_offset=Tk - 1, window=window)
    _close(ck.attention_decode(cp.asarray(q), cp.asarray(k), cp.asarray(v), causal, Tk - 1, window, D ** -0.5), want)
    _close(K.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), causal=causal, q_offset=Tk - 1, window=window), want)


def test_attention_decode_on_kv_cache_views(cp):
    # a preallocated cache [max_ctx, Hkv, D] sliced to the filled part, and a head-major cache
    q, k, v = _x((1, 6, 64), 4), _x((50, 2, 64), 5), _x((50, 2, 64), 6)
    cache_k = cp.zeros((128, 2, 64), cp.float32)
    cache_v = cp.zeros((128, 2, 64), cp.float32)
    cache_k[:50], cache_v[:50] = cp.asarray(k), cp.asarray(v)
    want = K.attention(q, k, v, q_offset=49)
    _close(K.attention(cp.asarray(q), cache_k[:50], cache_v[:50], q_offset=49), want)
    hk = cp.ascontiguousarray(cp.asarray(k).transpose(1, 0, 2))      # [Hkv, T, D]
    hv = cp.ascontiguousarray(cp.asarray(v).transpose(1, 0, 2))
    _close(K.attention(cp.asarray(q), hk.transpose(1, 0, 2), hv.transpose(1, 0, 2), q_offset=49), want)
    # an earlier position of the same cache (q_offset < Tk - 1) and a value dim > 256 (fallback path)
    _close(K.attention(cp.asarray(q), cache_k[:50], cache_v[:50], q_offset=20), K.attention(q, k, v, q_offset=20))
    v2 = _x((50, 2, 320), 7)
    _close(K.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v2), q_offset=49), K.attention(q, k, v2, q_offset=49))


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("rows,cols,n", [(1536, 576, 1), (576, 1536, 1), (300, 96, 3)])
def test_qmatvec_kernel(cp, ck, qname, rows, cols, n):
    import gguf
    quants = pytest.importorskip("spark_lab.quants")
    qtype = gguf.GGMLQuantizationType[qname]
    data = gguf.quants.quantize(_x((rows, cols), 8), qtype)
    x = _x((n, cols), 9)
    want = x.astype(np.float64) @ gguf.quants.dequantize(data, qtype).astype(np.float64).T
    _close(ck.qmatvec(cp.asarray(x), cp.asarray(data), int(qtype), rows, cols), want, rtol=1e-4, atol=1e-3)
    # through linear, x is first rounded to int8 blocks as on the CPU: the CPU kernels' numbers
    qm = pytest.importorskip("spark_lab.kernels.qmatvec")
    host = quants.QuantTensor(data, qtype, (rows, cols))
    qt = quants.QuantTensor(cp.asarray(data), qtype, (rows, cols))
    _close(K.linear(cp.asarray(x), qt), qm.reference(x, host), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_1", "Q4_0", "Q4_K", "Q6_K"])
def test_quant_linear_gpu_equals_cpu(cp, qname):
    """Prefill-sized and decode-sized products on the GPU give the CPU's numbers (int8-rounded x
    for the types whose CPU kernels round it), so greedy tokens agree between the two."""
    import gguf
    quants = pytest.importorskip("spark_lab.quants")
    qtype = gguf.GGMLQuantizationType[qname]
    from tests.test_quants import random_blocks         # gguf-py cannot quantize to the K types
    rows, cols = 320, 512
    bs, ts = quants.BLOCK_SIZES[qtype]
    data = random_blocks(qtype, rows * cols // bs, np.random.default_rng(10)).reshape(rows, -1)
    host = quants.QuantTensor(data, qtype, (rows, cols))
    dev = quants.QuantTensor(cp.asarray(data), qtype, (rows, cols))
    for n in (1, 3, 40):
        x = _x((n, cols), 11 + n)
        want = K.linear(x, host)
        # float32 sums in another order: within a few ulps of the output's scale
        _close(K.linear(cp.asarray(x), dev), want, rtol=2e-5, atol=2e-6 * float(np.abs(want).max()))


def test_generic_bodies_agree_on_cupy(cp):
    """conv2d, norms, activations, attention prefill, embeddings: one xp body, two backends."""
    x4, w4, b4 = _x((2, 16, 12, 12), 1), _x((32, 16, 3, 3), 2), _x(32, 3)
    g = cp.asarray
    _close(K.conv2d(g(x4), g(w4), g(b4), padding=1), K.conv2d(x4, w4, b4, padding=1), 1e-4, 1e-4)
    _close(K.conv2d(g(x4), g(w4[:, :4]), stride=2, padding=1, groups=4), K.conv2d(x4, w4[:, :4], stride=2, padding=1, groups=4), 1e-4, 1e-4)
    _close(K.group_norm(g(x4), 8, g(x4[0, :, 0, 0]), None, 1e-5), K.group_norm(x4, 8, x4[0, :, 0, 0], None, 1e-5))
    _close(K.upsample_nearest2d(g(x4)), K.upsample_nearest2d(x4), 0, 0)
    x2, w2 = _x((5, 96), 4), _x(96, 5)
    _close(K.layernorm(g(x2), g(w2), g(w2), 1e-5), K.layernorm(x2, w2, w2, 1e-5))
    _close(K.gelu(g(x2)), K.gelu(x2), 1e-5, 1e-6)
    _close(K.gelu(g(x2), "tanh"), K.gelu(x2, "tanh"), 1e-5, 1e-6)
    _close(K.geglu(g(x2)), K.geglu(x2), 1e-5, 1e-6)
    _close(K.swiglu(g(x2), g(x2[::-1])), K.swiglu(x2, x2[::-1]), 1e-5, 1e-6)
    _close(K.linear(g(x2), g(_x((40, 96), 6)), g(_x(40, 7))), K.linear(x2, _x((40, 96), 6), _x(40, 7)), 1e-4, 1e-4)
    q, k, v = _x((10, 6, 32), 8), _x((10, 2, 32), 9), _x((10, 2, 32), 10)
    _close(K.attention(g(q), g(k), g(v), window=4), K.attention(q, k, v, window=4))
    t = np.array([0, 10, 999])
    _close(K.timestep_embedding(g(t), 64, True, 0.0), K.timestep_embedding(t, 64, True, 0.0), 1e-5, 1e-4)
    table = _x((100, 8), 11)
    _close(K.embedding(g(table), g(np.array([5, 99, 0]))), table[[5, 99, 0]], 0, 0)


def _mxfp4_blocks(rows, cols, seed):
    """Random MXFP4 blocks u8 [rows, cols/32 * 17]: every code, E8M0 scales 2^-6 .. 2^1."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows * cols // 32, 17), dtype=np.uint8)
    b[:, 0] = rng.integers(121, 129, len(b))
    return b.reshape(rows, -1)


@pytest.mark.parametrize("rows,cols,n", [(2880, 2880, 1), (300, 96, 3), (37, 64, 2)])
def test_mxfp4_matvec_kernel(cp, ck, rows, cols, n):
    from spark_lab.kernels.linalg import round_x_q8
    from spark_lab.quants import QuantTensor, dequantize
    data, x = _mxfp4_blocks(rows, cols, 40), _x((n, cols), 41)
    want = x.astype(np.float64) @ dequantize(data, 39).astype(np.float64).T
    _close(ck.qmatvec(cp.asarray(x), cp.asarray(data), 39, rows, cols), want, rtol=1e-4, atol=1e-3)
    # with x rounded to int8 blocks first: the CPU kernel's numbers (kernels.qmatvec.reference)
    qm = pytest.importorskip("spark_lab.kernels.qmatvec")
    xr = round_x_q8(cp.asarray(x))
    _close(ck.qmatvec(xr, cp.asarray(data), 39, rows, cols), qm.reference(x, QuantTensor(data, 39, (rows, cols))),
           rtol=1e-5, atol=1e-4)


def test_mxfp4_moe_matvec_kernel(cp, ck):
    """The expert gather: k of n_expert experts, one x for all or one row per expert, against
    dequantize on the host and against the CPU's moe_matvec (x rounded to int8 as there)."""
    from spark_lab.quants import dequantize
    E, rows, cols = 8, 2880, 2880
    stack = np.stack([_mxfp4_blocks(rows, cols, 50 + e) for e in range(E)])        # [E, rows, 1530]
    ids = np.array([6, 1, 3, 0])
    x1, xk = _x(cols, 60), _x((4, cols), 61)
    w = {e: dequantize(stack[e], 39).astype(np.float64) for e in set(ids.tolist())}
    dstack = cp.asarray(stack)
    for x, dev_ids in ((x1, ids), (xk, cp.asarray(ids))):
        want = np.stack([w[e] @ (x if x.ndim == 1 else x[j]).astype(np.float64) for j, e in enumerate(ids)])
        got = ck.moe_matvec_mxfp4(cp.asarray(x), dstack, dev_ids, round_x=False)
        assert got.shape == (4, rows)
        _close(got, want, rtol=1e-4, atol=1e-3)
    qm = pytest.importorskip("spark_lab.kernels.qmatvec")
    cpu = qm.moe_matvec(xk, qm.ExpertStack(stack, 39, (E, rows, cols)), ids)
    _close(ck.moe_matvec_mxfp4(cp.asarray(xk), dstack, ids), cpu, rtol=1e-5, atol=1e-4)
    bad = ck.moe_matvec_mxfp4(cp.asarray(x1), dstack, cp.asarray(np.array([2, E], np.int32)), round_x=False)
    assert not bool(cp.isnan(bad[0]).any()) and bool(cp.isnan(bad[1]).all())     # a device id out of range: NaN row
    with pytest.raises(ValueError, match=r"expert ids must be integers in \[0, 8\)"):
        ck.moe_matvec_mxfp4(cp.asarray(x1), dstack, [E])


@pytest.mark.parametrize("n", [1, 3, 20])
def test_mxfp4_linear_gpu_equals_cpu(cp, n):
    """linear on CuPy with an MXFP4 weight (mat-vec kernel for a few rows, dequantize + GEMM for
    more) gives the CPU kernels' numbers: x rounded to int8 blocks on both."""
    from spark_lab.quants import QuantTensor
    qm = pytest.importorskip("spark_lab.kernels.qmatvec")
    rows, cols = 320, 512
    data, x = _mxfp4_blocks(rows, cols, 70), _x((n, cols), 71)
    want = qm.reference(x, QuantTensor(data, 39, (rows, cols)))
    _close(K.linear(cp.asarray(x), QuantTensor(cp.asarray(data), 39, (rows, cols))), want, rtol=1e-5, atol=1e-4)
    _close(K.linear(x, QuantTensor(data, 39, (rows, cols))), want, rtol=1e-5, atol=1e-4)
